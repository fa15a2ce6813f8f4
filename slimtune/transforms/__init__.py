"""Structural transforms: pure functions ``(model, plan) -> new model``.

Each method is one function ``(model, plan, calibration) -> model`` reading its own part of the
plan; ``calibration`` carries activation statistics of the uncompressed model for methods that
are activation-aware. They run in a fixed order: pruning first (it changes the shapes that
low-rank factorises), then low-rank. Quantization is not a torch
transform: it is applied to the exported ONNX graph, where its bytes and kernels are real
(``slimtune.export``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from slimtune.plan import CompressionPlan
from slimtune.transforms.calibration import Calibration, collect_calibration
from slimtune.transforms.depth import drop_blocks
from slimtune.transforms.heads import prune_attention_heads
from slimtune.transforms.lowrank import LowRankLinear, factorise_linears
from slimtune.transforms.prune import prune_ffn_neurons

Transform = Callable[[nn.Module, CompressionPlan, Calibration | None], nn.Module]

STRUCTURAL_TRANSFORMS: dict[str, Transform] = {
    "depth_prune": drop_blocks,
    "head_prune": prune_attention_heads,
    "ffn_prune": prune_ffn_neurons,
    "low_rank": factorise_linears,
}


def apply_structural(model: nn.Module, plan: CompressionPlan, calibration: Calibration | None = None) -> nn.Module:
    """A transformed copy of ``model``; the original is never modified."""
    out = copy.deepcopy(model).eval()
    for transform in STRUCTURAL_TRANSFORMS.values():
        out = transform(out, plan, calibration)
    return out


__all__ = ["Calibration", "LowRankLinear", "STRUCTURAL_TRANSFORMS", "apply_structural", "collect_calibration"]
