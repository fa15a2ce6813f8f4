"""Search spaces: an Optuna trial becomes a CompressionPlan.

The space is define-by-run: ``SearchSpace.suggest(trial)`` asks the trial for a few readable
choices per group of transformer blocks and expands them to per-module entries of a plan. Param
names are what people read in MLflow, e.g. ``encoder.layer.3.ffn.bits`` (32 means unquantized),
``encoder.layer.3.ffn.sparsity`` (fraction of FFN neurons removed), ``encoder.layer.3.ffn.rank``
(fraction of full rank kept), ``embeddings.bits`` and, for a language model, ``lm_head.bits`` (its
output projection, stored apart from a tied input table once quantized). A dimension with a single choice is fixed
and asks the trial nothing. Ranks that would not remove parameters for a role's shapes are not
offered. Test it with ``optuna.trial.FixedTrial``; no study is needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from slimtune.config import BLOCKWISE_FORMATS, FORMAT_OF_BITS, WEIGHT_FORMAT_BITS, SpaceConfig
from slimtune.layout import BlockLayout, ModelLayout
from slimtune.plan import CompressionPlan, QuantSpec, RecoverySpec, factor_rank, pruned_width
from slimtune.spaces.dimensions import (
    BITS,
    BLOCK,
    DROPPED,
    HEADS,
    LAYER_ROLES,
    METHOD,
    RANK,
    SPARSITY,
    STEPS,
    dimension,
    knob,
)


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


def depth_counts(blocks: int, fractions: tuple[float, ...]) -> tuple[int, ...]:
    """Whole blocks removed for each fraction of ``blocks`` (rounded, at least one block kept)."""
    return tuple(sorted({min(blocks - 1, round(f * blocks)) for f in fractions}))


@dataclass(frozen=True)
class SearchSpace:
    """The choices of one model: what each open dimension offers, and how choices become a plan.

    ``block_order`` lists the blocks from least to most important (``Calibration.blocks_by_importance``):
    depth pruning is offered only with it, and removes blocks in that order. ``head_groups`` says how
    many prunable attention-head groups each block has (``transforms.heads.head_groups``): head
    pruning is offered only for groups of blocks that all have two or more. ``recovery`` is the
    distillation recipe: with ``recover_in_trials`` every plan that changes shapes carries it (the
    fixed param ``recovery.steps``); otherwise only choices that name ``recovery.steps`` (points of
    the final front, recovered after the search) do. ``excluded``: options not offered per
    dimension (the sensitivity profile's narrowing; a dimension keeps at least its first option).
    """

    layout: ModelLayout
    config: SpaceConfig
    block_order: tuple[str, ...] = ()
    head_groups: Mapping[str, int] = field(default_factory=dict)
    recovery: RecoverySpec | None = None
    recover_in_trials: bool = False
    excluded: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

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

    def _heads_prunable(self, group: BlockGroup) -> bool:
        return all(self.head_groups.get(block.name, 0) >= 2 for block in group.blocks)

    def dimensions(self) -> dict[str, tuple[Any, ...]]:
        """Every param name with its choices, in suggestion order (fixed dimensions included)."""
        cfg = self.config
        bits = tuple(WEIGHT_FORMAT_BITS[f] for f in cfg.weight_formats)
        blockwise = bool(set(BLOCKWISE_FORMATS) & set(cfg.weight_formats))
        dims: dict[str, tuple[Any, ...]] = {}
        if self.layout.embedding is not None:
            dims[dimension("embeddings", BITS)] = tuple(WEIGHT_FORMAT_BITS[f] for f in cfg.embedding_formats)
            if "int4" in cfg.embedding_formats:
                dims[dimension("embeddings", BLOCK)] = cfg.embedding_block_sizes
        if self.layout.output_head is not None:
            head = tuple(WEIGHT_FORMAT_BITS[f] for f in cfg.lm_head_formats) if cfg.lm_head_formats else bits
            dims[dimension("lm_head", BITS)] = head
            if any(FORMAT_OF_BITS[b] in BLOCKWISE_FORMATS for b in head):
                dims[dimension("lm_head", BLOCK)] = cfg.block_sizes
        if self.block_order and len(self.layout.blocks) > 1:
            dims[dimension("blocks", DROPPED)] = depth_counts(len(self.layout.blocks), cfg.depth_fractions)
        if blockwise:
            dims[dimension("int4", METHOD)] = cfg.int4_methods
        for group in self.groups:
            block = group.blocks[0]
            if block.attention:
                dims[dimension(group.label, "attention", BITS)] = bits
                if blockwise:
                    dims[dimension(group.label, "attention", BLOCK)] = cfg.block_sizes
                dims[dimension(group.label, "attention", HEADS)] = cfg.head_fractions if self._heads_prunable(group) else (0.0,)
                dims[dimension(group.label, "attention", RANK)] = self._useful_ranks(block, "attention")
            if block.ffn:
                dims[dimension(group.label, "ffn", BITS)] = bits
                if blockwise:
                    dims[dimension(group.label, "ffn", BLOCK)] = cfg.block_sizes
                dims[dimension(group.label, "ffn", SPARSITY)] = cfg.ffn_sparsities
                dims[dimension(group.label, "ffn", RANK)] = self._useful_ranks(block, "ffn")
        if any(len(options) > 1 for name, options in dims.items() if knob(name) == RANK):
            dims[dimension("low_rank", METHOD)] = cfg.low_rank_methods
        if self.recover_in_trials and self.recovery is not None:
            dims[dimension("recovery", STEPS)] = (self.recovery.steps,)
        for name, options in self.excluded.items():
            if name in dims:
                dims[name] = tuple(o for o in dims[name] if o not in options) or dims[name][:1]
        return dims

    def suggest(self, trial) -> CompressionPlan:
        """Define-by-run: ask the trial for each open dimension, then build the plan."""
        choices = {
            name: options[0] if len(options) == 1 else trial.suggest_categorical(name, list(options))
            for name, options in self.dimensions().items()
        }
        return self.plan_from_choices(choices)

    def plan_from_choices(self, choices: Mapping[str, Any]) -> CompressionPlan:
        dims = self.dimensions()

        def pick(name: str) -> Any:
            return choices.get(name, dims[name][0]) if name in dims else None

        quantize: dict[str, QuantSpec] = {}
        low_rank: dict[str, float] = {}
        ffn_prune: dict[str, float] = {}
        head_prune: dict[str, float] = {}
        method = pick(dimension("int4", METHOD)) or "rtn"
        if self.layout.embedding is not None:
            table = QuantSpec(FORMAT_OF_BITS[int(pick(dimension("embeddings", BITS)))],
                              int(pick(dimension("embeddings", BLOCK)) or 32))
            quantize[self.layout.embedding] = table
            # Position / type tables follow as int8 rows whenever the token table is quantized: near
            # lossless (MiniLM: pooled cosine 0.9975 with every table int8), where 4-bit positions are not (0.975).
            for other in self.layout.other_tables:
                quantize[other] = QuantSpec("int8" if table.format != "fp32" else "fp32")
        if self.layout.output_head is not None:
            quantize[self.layout.output_head] = QuantSpec(FORMAT_OF_BITS[int(pick(dimension("lm_head", BITS)))],
                                                          int(pick(dimension("lm_head", BLOCK)) or 32), method)
        for group in self.groups:
            for block in group.blocks:
                for role, names in zip(LAYER_ROLES, (block.attention, block.ffn), strict=True):
                    if not names:
                        continue
                    spec = QuantSpec(FORMAT_OF_BITS[int(pick(dimension(group.label, role, BITS)))],
                                     int(pick(dimension(group.label, role, BLOCK)) or 32), method)
                    rank = float(pick(dimension(group.label, role, RANK)))
                    for name in names:
                        quantize[name] = spec
                        low_rank[name] = rank
                if block.ffn:
                    ffn_prune[block.name] = float(pick(dimension(group.label, "ffn", SPARSITY)))
                if block.attention:
                    head_prune[block.name] = float(pick(dimension(group.label, "attention", HEADS)))
        dropped = int(pick(dimension("blocks", DROPPED)) or 0)
        depth_prune = tuple(sorted(self.block_order[:dropped]))
        steps = int(choices.get("recovery.steps", pick("recovery.steps") or 0))  # fixed in trials mode
        # front recovery runs with a time budget and records the steps it did, exactly (no flat rule)
        exact = {key: choices[f"recovery.{key}"] for key in ("flat_patience", "budget_s") if f"recovery.{key}" in choices}
        recovery = dataclasses.replace(self.recovery, steps=steps, **exact) if steps and self.recovery else None
        return CompressionPlan(quantize=quantize, low_rank=low_rank, ffn_prune=ffn_prune, head_prune=head_prune,
                               depth_prune=depth_prune, low_rank_method=pick(dimension("low_rank", METHOD)) or "svd",
                               recovery=recovery)

    def reference_points(self) -> dict[str, dict[str, Any]]:
        """Plans every search evaluates first, as params for the open dimensions.

        The uncompressed model and uniform int8 (the figures every front is read against), for a
        language model (a model with an LM head) uniform 4-bit as well, then uniform int8 with each
        FFN sparsity of the space (width pruning on top of the fast int8 kernels): measured starting
        points that the sampler evolves from. A point is left out
        when the configured space cannot express it (e.g. no fp32 choice). Dimensions a target
        does not name take their first choice.
        """
        targets = {
            "fp32": {"bits": 32, "sparsity": 0.0, "rank": 1.0, "heads": 0.0, "dropped": 0},
            "uniform-int8": {"bits": 8, "sparsity": 0.0, "rank": 1.0, "heads": 0.0, "dropped": 0},
        }
        if self.layout.output_head is not None:
            # A language model's one-command compression: 4-bit weights everywhere (round-to-nearest
            # at the first block size), which batch-1 decoding, bound by reading weights, rewards.
            targets["uniform-int4"] = {**targets["uniform-int8"], "bits": 4, "int4.method": "rtn"}
        for sparsity in sorted(s for s in self.config.ffn_sparsities if s > 0):
            targets[f"uniform-int8-ffn{round(sparsity * 100)}"] = {**targets["uniform-int8"], "sparsity": sparsity}
        dims = self.dimensions()
        points = {}
        for name, target in targets.items():
            params = {}
            for dim, options in dims.items():
                value = target.get(dim, target.get(dim.rpartition(".")[2], options[0]))  # a full name, else its role
                if value not in options:
                    break
                if len(options) > 1:
                    params[dim] = value
            else:
                points[name] = params
        return points
