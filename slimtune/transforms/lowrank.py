"""Low-rank factorisation of Linear layers by truncated SVD, plain or activation-aware (ASVD).

W (out x in) ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T): one Linear becomes two smaller ones, in -> r
without bias and r -> out with the original bias. Applied only where the factors hold fewer
parameters than W (``plan.factor_rank``), so a factorised layer is always physically smaller.

Plain SVD minimises the error on the weights, as if every input channel were equally large. In a
transformer they are not: a few channels carry activations many times larger than the rest, and
an error in their columns of W costs that much more in the output. ASVD (Yuan et al. 2023,
``plan.low_rank_method == "asvd"``) factorises W S instead, S = diag(s), s_j = (mean |x_j|)^alpha
over the calibration tokens entering the Linear, alpha = 0.5 (the paper's choice), and folds S^-1
back into the first factor: W ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T S^-1). The activations are those
of the model being factorised, after pruning, measured in one forward pass over the calibration
texts (padding excluded) with hooks on the planned Linears only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from slimtune.plan import CompressionPlan, PlanError, factor_rank
from slimtune.transforms.calibration import BatchDone, Calibration, run_masked_batches


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


ASVD_ALPHA = 0.5  # exponent on the channel magnitudes: 0 is plain SVD, 1 weighs channels fully
_SCALE_FLOOR = 1e-3  # channel scales below this fraction of the largest are raised to it (see asvd_scales)


FACTOR_CACHE_BYTES = 64 * 2**20
"""Plain-SVD factors kept per process: a search factorises the same (pruned) matrices at the same
ranks again and again. ASVD's are not kept: its scales come from the activations of each plan's
own pruned model, so its matrices seldom repeat."""
_factor_cache: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()


def _factor_weights(weight: torch.Tensor, rank: int, scales: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) float64 factor weights of W (out x in), or of W diag(scales) with the scales
    folded back into the first (ASVD)."""
    weight = weight.double()
    if scales is not None:
        weight = weight * scales[None, :]
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    first_weight = root[:, None] * vh[:rank]
    if scales is not None:
        first_weight = first_weight / scales[None, :]
    return first_weight, u[:, :rank] * root[None, :]


def _cached_factor_weights(weight: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``_factor_weights`` of a plain SVD in ``dtype``, remembered by the matrix's bytes and the rank
    (the same matrix gives the same factors, so a plan builds the same bytes either way); the least
    recently used are dropped past ``FACTOR_CACHE_BYTES``."""
    key = hashlib.sha256(weight.numpy().tobytes()).digest() + f"{tuple(weight.shape)}/{rank}/{dtype}".encode()
    if key in _factor_cache:
        _factor_cache.move_to_end(key)
        return _factor_cache[key]
    factors = tuple(f.to(dtype) for f in _factor_weights(weight, rank, None))
    _factor_cache[key] = factors
    while sum(t.numel() * t.element_size() for f in _factor_cache.values() for t in f) > FACTOR_CACHE_BYTES:
        _factor_cache.popitem(last=False)
    return factors


def factorise(linear: nn.Linear, rank: int, scales: torch.Tensor | None = None) -> LowRankLinear:
    """Truncated SVD of W, or of W diag(scales) with diag(scales)^-1 folded into the first factor (ASVD)."""
    weight, dtype = linear.weight.detach(), linear.weight.dtype
    if scales is None:
        first_weight, second_weight = _cached_factor_weights(weight, rank, dtype)
    else:
        first_weight, second_weight = (f.to(dtype) for f in _factor_weights(weight, rank, scales))
    first = nn.Linear(linear.in_features, rank, bias=False)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        first.weight.copy_(first_weight)
        second.weight.copy_(second_weight)
        if linear.bias is not None:
            second.bias.copy_(linear.bias.detach())
    return LowRankLinear(first, second)


def asvd_scales(mean_abs: torch.Tensor, alpha: float = ASVD_ALPHA) -> torch.Tensor:
    """s_j = (mean |x_j|)^alpha, float64, floored at ``_SCALE_FLOOR`` x the largest.

    The floor keeps S invertible: a channel silent on the calibration texts would otherwise get a
    zero column in W S and an unbounded one in the first factor, ruining texts where it does fire.
    """
    scales = mean_abs.double().clamp(min=0).pow(alpha)
    return scales.clamp(min=float(scales.max()) * _SCALE_FLOOR if scales.max() > 0 else 1.0)


@torch.no_grad()
def input_magnitudes(model: nn.Module, names: list[str], calibration: Calibration | None,
                     batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Linear name -> mean |x_j| (float64, per input channel) over the non-padding calibration tokens.

    One forward pass of ``model`` as it is now (possibly already pruned) with hooks on ``names`` only;
    after the first batch, each batch's pass ends once every hooked Linear has seen its input as
    often as in the first (``BatchDone``: the layers after the deepest one compute nothing these
    statistics read, and the sums are the same). An input whose leading dimensions are not
    (batch, sequence), such as a pooler's, is averaged over all its rows.
    """
    if calibration is None or calibration.input_ids is None or calibration.attention_mask is None:
        raise PlanError("low_rank_method 'asvd' needs calibration texts: pass the Calibration from "
                        "collect_calibration(model, input_ids, attention_mask), or use low_rank_method 'svd'")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current_mask: list[torch.Tensor] = []
    calls: dict[str, int] = {}  # name -> inputs recorded in this batch
    per_pass: dict[str, int] = {}  # ... in the first batch's whole pass (a shared module runs more than once)
    batch: list[torch.Tensor] = []  # the mask of the batch ``calls`` counts

    def recorder(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x, mask = inputs[0].detach().abs().double(), current_mask[0]
            if batch and batch[0] is not mask:  # a new batch: the first one's counts are a whole pass's
                if not per_pass:
                    per_pass.update(calls)
                calls.clear()
            batch[:] = [mask]
            if x.shape[:-1] == mask.shape:
                x, tokens = x * mask[..., None], int(mask.sum())
            else:
                tokens = x.numel() // x.shape[-1]
            sums[name] = sums.get(name, 0) + x.reshape(-1, x.shape[-1]).sum(0)
            counts[name] = counts.get(name, 0) + tokens
            calls[name] = calls.get(name, 0) + 1
            if per_pass and calls == per_pass:
                raise BatchDone
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(recorder(name)) for name in names]
    was_training = model.training
    model.eval()
    try:
        run_masked_batches(model, calibration.input_ids, calibration.attention_mask, hooks, current_mask, batch_size)
    finally:
        model.train(was_training)
    missing = [name for name in names if name not in sums]
    if missing:
        raise PlanError(f"low_rank_method 'asvd': no calibration activations reached {missing[:3]}")
    return {name: sums[name] / max(counts[name], 1) for name in names}


def _planned_linears(model: nn.Module, plan: CompressionPlan) -> dict[str, tuple[nn.Linear, int]]:
    """Planned Linear name -> (module, rank) for those where factorising saves parameters."""
    planned = {}
    for name, fraction in plan.low_rank.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise PlanError(f"low_rank names {name!r}, which is not a module of this model") from exc
        if not isinstance(linear, nn.Linear):
            raise PlanError(f"low_rank names {name!r}, a {type(linear).__name__}; only Linear layers factorise")
        rank = factor_rank(linear.in_features, linear.out_features, fraction)
        if rank is not None:
            planned[name] = (linear, rank)
    return planned


def factorise_linears(model: nn.Module, plan: CompressionPlan, calibration: Calibration | None = None) -> nn.Module:
    """Replace each planned Linear by its truncated-SVD factors, in place on ``model``.

    ``svd``: ``calibration`` is not used. ``asvd``: the planned Linears' input magnitudes are
    measured on ``calibration.input_ids`` first (PlanError without them), then every Linear is
    factorised with its scales.
    """
    planned = _planned_linears(model, plan)
    magnitudes: Mapping[str, torch.Tensor] = {}
    if plan.low_rank_method == "asvd" and planned:
        magnitudes = input_magnitudes(model, list(planned), calibration)
    for name, (linear, rank) in planned.items():
        scales = asvd_scales(magnitudes[name]) if name in magnitudes else None
        model.set_submodule(name, factorise(linear, rank, scales))
    return model
