"""Search spaces: an Optuna trial becomes a CompressionPlan.

The space is define-by-run: ``SearchSpace.suggest(trial)`` asks the trial for a few readable
choices per group of transformer blocks and expands them to per-module entries of a plan. Param
names are what people read in MLflow, e.g. ``encoder.layer.3.ffn.bits`` (32 means unquantized),
``encoder.layer.3.ffn.sparsity`` (fraction of FFN neurons removed), ``encoder.layer.3.ffn.rank``
(fraction of full rank kept), and ``embeddings.bits``. A dimension with a single choice is fixed
and asks the trial nothing. Ranks that would not remove parameters for a role's shapes are not
offered. Test it with ``optuna.trial.FixedTrial``; no study is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slimtune.config import SpaceConfig
from slimtune.layout import BlockLayout, ModelLayout
from slimtune.plan import CompressionPlan, QuantSpec, factor_rank, pruned_width

BITS_OF_FORMAT = {"fp32": 32, "int8": 8, "int4": 4}
FORMAT_OF_BITS = {bits: fmt for fmt, bits in BITS_OF_FORMAT.items()}


@dataclass(frozen=True)
class BlockGroup:
    """Consecutive blocks that share one set of choices; ``label`` prefixes their param names."""

    label: str
    blocks: tuple[BlockLayout, ...]


def group_blocks(layout: ModelLayout, group_size: int) -> tuple[BlockGroup, ...]:
    groups = []
    for start in range(0, len(layout.blocks), group_size):
        members = layout.blocks[start:start + group_size]
        first, last = members[0].name, members[-1].name
        prefix, _, first_index = first.rpartition(".")
        label = first if len(members) == 1 else f"{prefix}.{first_index}-{last.rpartition('.')[2]}"
        groups.append(BlockGroup(label=label, blocks=members))
    return tuple(groups)


@dataclass(frozen=True)
class SearchSpace:
    layout: ModelLayout
    config: SpaceConfig

    @property
    def groups(self) -> tuple[BlockGroup, ...]:
        return group_blocks(self.layout, self.config.group_size)

    def _useful_ranks(self, block: BlockLayout, role: str) -> tuple[float, ...]:
        """Rank fractions that remove parameters from at least one Linear of the role."""
        names = block.attention if role == "attention" else block.ffn
        sparsity = max(self.config.ffn_sparsities) if role == "ffn" else 0.0
        useful = []
        for fraction in self.config.rank_fractions:
            for name in names:
                n_in, n_out = self.layout.shape(name)
                if role == "ffn" and name in block.ffn_up:
                    n_out = pruned_width(n_out, sparsity)
                elif role == "ffn":
                    n_in = pruned_width(n_in, sparsity)
                if fraction == 1.0 or factor_rank(n_in, n_out, fraction) is not None:
                    useful.append(fraction)
                    break
        return tuple(useful) or (1.0,)

    def dimensions(self) -> dict[str, tuple[Any, ...]]:
        """Every param name with its choices, in suggestion order (fixed dimensions included)."""
        cfg = self.config
        bits = tuple(BITS_OF_FORMAT[f] for f in cfg.weight_formats)
        dims: dict[str, tuple[Any, ...]] = {}
        if self.layout.embedding is not None:
            dims["embeddings.bits"] = tuple(BITS_OF_FORMAT[f] for f in cfg.embedding_formats)
        for group in self.groups:
            block = group.blocks[0]
            if block.attention:
                dims[f"{group.label}.attention.bits"] = bits
                dims[f"{group.label}.attention.rank"] = self._useful_ranks(block, "attention")
            if block.ffn:
                dims[f"{group.label}.ffn.bits"] = bits
                dims[f"{group.label}.ffn.sparsity"] = cfg.ffn_sparsities
                dims[f"{group.label}.ffn.rank"] = self._useful_ranks(block, "ffn")
        return dims

    def suggest(self, trial) -> CompressionPlan:
        """Define-by-run: ask the trial for each open dimension, then build the plan."""
        choices = {
            name: options[0] if len(options) == 1 else trial.suggest_categorical(name, list(options))
            for name, options in self.dimensions().items()
        }
        return self.plan_from_choices(choices)

    def plan_from_choices(self, choices: Mapping[str, Any]) -> CompressionPlan:
        quantize: dict[str, QuantSpec] = {}
        low_rank: dict[str, float] = {}
        ffn_prune: dict[str, float] = {}
        block_size = self.config.int4_block_size
        if self.layout.embedding is not None:
            quantize[self.layout.embedding] = QuantSpec(FORMAT_OF_BITS[int(choices["embeddings.bits"])])
        for group in self.groups:
            for block in group.blocks:
                for role, names in (("attention", block.attention), ("ffn", block.ffn)):
                    if not names:
                        continue
                    spec = QuantSpec(FORMAT_OF_BITS[int(choices[f"{group.label}.{role}.bits"])], block_size)
                    rank = float(choices[f"{group.label}.{role}.rank"])
                    for name in names:
                        quantize[name] = spec
                        low_rank[name] = rank
                if block.ffn:
                    ffn_prune[block.name] = float(choices[f"{group.label}.ffn.sparsity"])
        return CompressionPlan(quantize=quantize, low_rank=low_rank, ffn_prune=ffn_prune)

    def reference_points(self) -> dict[str, dict[str, Any]]:
        """Plans every search evaluates first, as params for the open dimensions.

        The uncompressed model and uniform int8 (the figures every front is read against), then
        uniform int8 with each FFN sparsity of the space (width pruning on top of the fast int8
        kernels): measured starting points that the sampler evolves from. A point is left out
        when the configured space cannot express it (e.g. no fp32 choice).
        """
        targets = {
            "fp32": {"bits": 32, "sparsity": 0.0, "rank": 1.0},
            "uniform-int8": {"bits": 8, "sparsity": 0.0, "rank": 1.0},
        }
        for sparsity in sorted(s for s in self.config.ffn_sparsities if s > 0):
            targets[f"uniform-int8-ffn{round(sparsity * 100)}"] = {"bits": 8, "sparsity": sparsity, "rank": 1.0}
        dims = self.dimensions()
        points = {}
        for name, target in targets.items():
            params = {}
            for dim, options in dims.items():
                value = target[dim.rpartition(".")[2]]
                if value not in options:
                    break
                if len(options) > 1:
                    params[dim] = value
            else:
                points[name] = params
        return points
