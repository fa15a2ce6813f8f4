"""Width pruning of FFN neurons (Minitron-style structured pruning).

Removing intermediate neuron j deletes row j of every up projection (a gated MLP's gate and up)
and column j of the down projection, so the pruned Linears are physically smaller: fewer
parameters, fewer bytes, fewer FLOPs.

Neurons are ranked by importance. With calibration statistics (``calibration.py``) it is
activation-aware: mean |activation| x the L2 norm of the neuron's down-projection column. Without,
it falls back to weights alone: the product of the norms of the neuron's rows in the up
projections and its column in the down projection. On MiniLM / BBC News, pruning half of every
FFN kept 0.945 accuracy with activation-aware importance and 0.86 with weights alone (fp32: 0.97).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from slimtune.layout import discover_layout
from slimtune.plan import CompressionPlan, PlanError, pruned_width

if TYPE_CHECKING:  # calibration.py imports heads.py, which imports this module
    from slimtune.transforms.calibration import Calibration


def neuron_importance(ups: list[nn.Linear], downs: list[nn.Linear],
                      activation: np.ndarray | None = None) -> torch.Tensor:
    score = torch.ones(ups[0].out_features, dtype=torch.float64)
    if activation is not None:
        score *= torch.from_numpy(np.asarray(activation, dtype=np.float64))
    else:
        for up in ups:
            score *= up.weight.detach().double().norm(dim=1)
    for down in downs:
        score *= down.weight.detach().double().norm(dim=0)
    return score


def slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear with only the ``keep`` output rows (dim 0, bias sliced too) or input columns (dim 1)."""
    weight = linear.weight.detach().index_select(dim, keep)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach().index_select(0, keep))
    return out


def prune_ffn_neurons(model: nn.Module, plan: CompressionPlan, calibration: Calibration | None = None) -> nn.Module:
    """Remove ``plan.ffn_prune[block]`` of each block's FFN neurons, in place on ``model``."""
    if not plan.ffn_prune:
        return model
    activations = calibration.ffn_activation if calibration else {}
    blocks = {b.name: b for b in discover_layout(model).blocks}
    for block_name, sparsity in plan.ffn_prune.items():
        block = blocks.get(block_name)
        if block is None or not block.ffn:
            raise PlanError(f"ffn_prune names {block_name!r}, which is not a transformer block with an FFN")
        ups = [model.get_submodule(n) for n in block.ffn_up]
        downs = [model.get_submodule(n) for n in block.ffn_down]
        keep_count = pruned_width(ups[0].out_features, sparsity)
        importance = neuron_importance(ups, downs, activations.get(block_name))
        keep = torch.topk(importance, keep_count).indices.sort().values
        for name, up in zip(block.ffn_up, ups, strict=True):
            model.set_submodule(name, slice_linear(up, keep, dim=0))
        for name, down in zip(block.ffn_down, downs, strict=True):
            model.set_submodule(name, slice_linear(down, keep, dim=1))
    return model
