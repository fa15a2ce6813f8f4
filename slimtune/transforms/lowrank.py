"""Low-rank factorisation of Linear layers by truncated SVD.

W (out x in) ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T): one Linear becomes two smaller ones, in -> r
without bias and r -> out with the original bias. Applied only where the factors hold fewer
parameters than W (``plan.factor_rank``), so a factorised layer is always physically smaller.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.plan import CompressionPlan, PlanError, factor_rank
from slimtune.transforms.calibration import Calibration


class LowRankLinear(nn.Module):
    """Two Linears in sequence; exported as two MatMuls named ``<module>.first`` / ``.second``."""

    def __init__(self, first: nn.Linear, second: nn.Linear) -> None:
        super().__init__()
        self.first = first
        self.second = second

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def factorise(linear: nn.Linear, rank: int) -> LowRankLinear:
    weight = linear.weight.detach().double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(linear.in_features, rank, bias=False)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).to(linear.weight.dtype))
        second.weight.copy_((u[:, :rank] * root[None, :]).to(linear.weight.dtype))
        if linear.bias is not None:
            second.bias.copy_(linear.bias.detach())
    return LowRankLinear(first, second)


def factorise_linears(model: nn.Module, plan: CompressionPlan, calibration: Calibration | None = None) -> nn.Module:
    """Replace each planned Linear by its truncated-SVD factors, in place on ``model``.

    Plain SVD: ``calibration`` is accepted for a uniform transform signature and not used yet.
    """
    for name, fraction in plan.low_rank.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise PlanError(f"low_rank names {name!r}, which is not a module of this model") from exc
        if not isinstance(linear, nn.Linear):
            raise PlanError(f"low_rank names {name!r}, a {type(linear).__name__}; only Linear layers factorise")
        rank = factor_rank(linear.in_features, linear.out_features, fraction)
        if rank is not None:
            model.set_submodule(name, factorise(linear, rank))
    return model
