"""Attention-head pruning (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"; Minitron width).

Removing a head deletes its ``head_dim`` rows of the query, key and value projections (and their
biases) and the matching ``head_dim`` input columns of the output projection, so the attention
Linears are physically smaller: fewer parameters, bytes and FLOPs, and a smaller attention matrix.
Under grouped-query attention (fewer key/value heads than query heads) the unit removed is a whole
group: one key/value head plus the query heads that read it, so every remaining query head still
has its own key/value head and the query/key-value ratio is unchanged.

The roles are found from shapes, not names: a block's attention (``discover_layout``) must be
exactly four Linears in module order, three that read the hidden size (query = the widest, then key
and value) and an output projection, last, that writes the hidden size and reads what the query
writes. ``head_dim`` comes from the model config (``head_dim``, else hidden_size //
num_attention_heads). A fused query/key/value projection or a missing output projection does not
fit and raises ``PlanError``; ``head_groups`` says beforehand which blocks can be pruned.

BERT, DistilBERT and Llama attention in transformers 5.x reshape with ``-1`` heads
(``view(*input_shape, -1, head_dim)``), so their forward follows the sliced weights; head-count
attributes of the attention modules (``num_attention_heads``, ``n_heads``, ``all_head_size``, ...)
are updated anyway so that nothing reading them later sees the old count.

Groups are ranked by importance. With calibration (``Calibration.head_importance``) it is
activation-based: the mean over non-padding calibration tokens of the L2 norm of the group's
contribution to the output projection (its slice of the context vector times its slice of W_o).
Without calibration it falls back to weights alone: the product of the Frobenius norms of the
group's W_o columns and of its query, key and value rows -- blind to how large the heads'
activations actually are, so it is the weaker ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from slimtune.layout import BlockLayout, discover_layout
from slimtune.plan import CompressionPlan, PlanError, pruned_width
from slimtune.transforms.prune import slice_linear

if TYPE_CHECKING:  # calibration.py imports this module to collect head importance
    from slimtune.transforms.calibration import Calibration

_HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_heads", "n_head")
_KV_COUNT_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


@dataclass(frozen=True)
class AttentionRoles:
    """The four attention Linears of one block by role, and its head geometry (units: heads, features)."""

    query: str
    key: str
    value: str
    output: str
    head_dim: int
    groups: int  # key/value heads; one group = 1 kv head + ``ratio`` query heads
    ratio: int  # query heads per key/value head (1 without grouped-query attention)

    @property
    def query_heads(self) -> int:
        return self.groups * self.ratio

    def query_slice(self, group: int) -> slice:
        """Rows of the query (= input columns of the output projection) that belong to ``group``."""
        width = self.ratio * self.head_dim
        return slice(group * width, (group + 1) * width)

    def kv_slice(self, group: int) -> slice:
        return slice(group * self.head_dim, (group + 1) * self.head_dim)


def config_head_dim(model: nn.Module) -> int | None:
    """Features per head from the model config: ``head_dim``, else hidden_size // num_attention_heads."""
    config = getattr(model, "config", None)
    head_dim = getattr(config, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def attention_roles(model: nn.Module, block: BlockLayout, hidden_size: int) -> AttentionRoles:
    """The query/key/value/output Linears of ``block``; PlanError when its attention cannot be pruned by head."""
    head_dim = config_head_dim(model)
    if head_dim is None:
        raise PlanError(f"cannot prune heads in {block.name!r}: the model config gives no head_dim "
                        "(nor hidden_size and num_attention_heads)")
    names = list(block.attention)
    if len(names) != 4:
        raise PlanError(f"cannot prune heads in {block.name!r}: its attention has {len(names)} Linear layers, "
                        "not separate query, key, value and output projections (fused qkv?)")
    linears = {name: model.get_submodule(name) for name in names}
    *projections, output = names
    out = linears[output]
    query = max(projections, key=lambda n: linears[n].out_features)  # the first of the widest
    key, value = (n for n in projections if n != query)
    q, k, v = linears[query], linears[key], linears[value]
    fits = (
        all(m.in_features == hidden_size for m in (q, k, v))
        and out.out_features == hidden_size and out.in_features == q.out_features
        and k.out_features == v.out_features and k.out_features % head_dim == 0
        and q.out_features % k.out_features == 0
    )
    if not fits:
        shapes = ", ".join(f"{n} {linears[n].in_features}->{linears[n].out_features}" for n in names)
        raise PlanError(f"cannot prune heads in {block.name!r}: its attention Linears ({shapes}) are not "
                        f"query/key/value projections of {head_dim}-wide heads followed by an output projection")
    return AttentionRoles(query=query, key=key, value=value, output=output, head_dim=head_dim,
                          groups=k.out_features // head_dim, ratio=q.out_features // k.out_features)


def head_groups(model: nn.Module) -> dict[str, int]:
    """Block name -> number of prunable head groups (heads, or kv groups under GQA).

    Blocks whose attention cannot be pruned by head are absent (an empty dict for a model with fused
    qkv), so a search space offers ``head_prune`` only where this transform works.
    """
    layout = discover_layout(model)
    groups = {}
    for block in layout.blocks:
        try:
            groups[block.name] = attention_roles(model, block, layout.hidden_size).groups
        except PlanError:
            continue
    return groups


def group_contributions(context: torch.Tensor, output_weight: torch.Tensor, roles: AttentionRoles,
                        mask: torch.Tensor) -> torch.Tensor:
    """Per group, the sum over unmasked tokens of the L2 norm of its contribution to the output projection.

    ``context`` (..., query_heads*head_dim) is the output projection's input, ``output_weight`` its
    (hidden, query_heads*head_dim) weight, ``mask`` (...) 1 for real tokens. Float64, one value per group.
    """
    context, weight, mask = context.detach().double(), output_weight.detach().double(), mask.double()
    sums = torch.zeros(roles.groups, dtype=torch.float64)
    for group in range(roles.groups):
        cols = roles.query_slice(group)
        contribution = context[..., cols] @ weight[:, cols].T
        sums[group] = (contribution.norm(dim=-1) * mask).sum()
    return sums


def weight_importance(model: nn.Module, roles: AttentionRoles) -> torch.Tensor:
    """Weight-only group score: ||W_o columns|| x ||W_q rows|| x ||W_k rows|| x ||W_v rows|| (Frobenius)."""
    weights = {name: model.get_submodule(name).weight.detach().double()
               for name in (roles.query, roles.key, roles.value, roles.output)}
    score = torch.ones(roles.groups, dtype=torch.float64)
    for group in range(roles.groups):
        rows, kv = roles.query_slice(group), roles.kv_slice(group)
        score[group] = (weights[roles.output][:, rows].norm() * weights[roles.query][rows].norm()
                        * weights[roles.key][kv].norm() * weights[roles.value][kv].norm())
    return score


def _rows(slices: list[slice]) -> torch.Tensor:
    return torch.cat([torch.arange(s.start, s.stop) for s in slices])


def _update_head_counts(model: nn.Module, roles: AttentionRoles, kept_groups: int) -> None:
    """Set head-count attributes of the modules holding the projections to the pruned counts."""
    parents = {name.rpartition(".")[0] for name in (roles.query, roles.output)}
    for parent in parents:
        module = model.get_submodule(parent) if parent else model
        for attribute in _HEAD_COUNT_ATTRIBUTES:
            if isinstance(getattr(module, attribute, None), int):
                setattr(module, attribute, kept_groups * roles.ratio)
        for attribute in _KV_COUNT_ATTRIBUTES:
            if isinstance(getattr(module, attribute, None), int):
                setattr(module, attribute, kept_groups)
        if isinstance(getattr(module, "all_head_size", None), int):
            module.all_head_size = kept_groups * roles.ratio * roles.head_dim


def prune_attention_heads(model: nn.Module, plan: CompressionPlan,
                          calibration: Calibration | None = None) -> nn.Module:
    """Remove ``plan.head_prune[block]`` of each block's heads (whole kv groups), in place on ``model``.

    round(fraction x groups) groups go, at least one stays; the least important ones by
    ``calibration.head_importance`` when given, else by weights alone (module docstring).
    """
    if not plan.head_prune:
        return model
    importance = calibration.head_importance if calibration is not None else {}
    layout = discover_layout(model)
    blocks = {b.name: b for b in layout.blocks}
    for block_name, fraction in plan.head_prune.items():
        block = blocks.get(block_name)
        if block is None:
            raise PlanError(f"head_prune names {block_name!r}, which is not a transformer block of this model")
        roles = attention_roles(model, block, layout.hidden_size)
        keep_count = pruned_width(roles.groups, fraction)
        if keep_count == roles.groups:
            continue
        if block_name in importance:
            score = torch.from_numpy(np.asarray(importance[block_name], dtype=np.float64))
            if score.shape != (roles.groups,):
                raise PlanError(f"calibration has {score.numel()} head scores for {block_name!r}, which has "
                                f"{roles.groups} head groups: calibrate this model before pruning it")
        else:
            score = weight_importance(model, roles)
        keep = sorted(torch.topk(score, keep_count).indices.tolist())
        query_rows = _rows([roles.query_slice(g) for g in keep])
        kv_rows = _rows([roles.kv_slice(g) for g in keep])
        for name, rows in ((roles.query, query_rows), (roles.key, kv_rows), (roles.value, kv_rows)):
            model.set_submodule(name, slice_linear(model.get_submodule(name), rows, dim=0))
        model.set_submodule(roles.output, slice_linear(model.get_submodule(roles.output), query_rows, dim=1))
        _update_head_counts(model, roles, keep_count)
    return model
