"""The names of a search space's dimensions, ``<scope>.<knob>``: ``encoder.layer.0-1.ffn.bits``,
``embeddings.bits``, ``blocks.dropped``. The knob (the last part) says what a dimension sets; the
space builds the names from these, and the sensitivity profile reads them back."""

from __future__ import annotations

BITS, BLOCK, HEADS, RANK, SPARSITY, DROPPED, METHOD, STEPS = (
    "bits", "block", "heads", "rank", "sparsity", "dropped", "method", "steps")
LAYER_ROLES = ("attention", "ffn")
"""A block's two groups of Linears, each with its own bits, block size and rank."""

UNCOMPRESSED = {BITS: 32, SPARSITY: 0.0, RANK: 1.0, HEADS: 0.0, DROPPED: 0}
"""Each knob that compresses on its own, and its option that changes nothing (fp32 weights,
nothing removed, full rank). Block sizes and methods only shape a format."""
LOWER_COMPRESSES = (BITS, RANK)
"""Knobs whose lower option compresses more (for the others, a higher one: a larger removed fraction)."""


def dimension(*parts: str) -> str:
    """``dimension("encoder.layer.0-1", "ffn", BITS)`` -> ``"encoder.layer.0-1.ffn.bits"``."""
    return ".".join(parts)


def knob(name: str) -> str:
    """What the dimension ``name`` sets: its last part."""
    return name.rpartition(".")[2]


def is_layer_bits(name: str) -> bool:
    """Whether ``name`` sets the weight format of a block group's attention or FFN Linears."""
    scope, _, last = name.rpartition(".")
    return last == BITS and scope.rpartition(".")[2] in LAYER_ROLES
