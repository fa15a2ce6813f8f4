"""Activation statistics that make FFN pruning activation-aware (as in Minitron).

One forward pass of the uncompressed model over a few training texts records, for every FFN
neuron, the mean absolute value it feeds into the down projection (padding tokens excluded).
A neuron's importance is then that mean times the norm of its down-projection column: the
typical size of what it adds to the residual stream. Computed once per worker, reused by every
trial; the same texts give the same statistics, so plans still rebuild to the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from slimtune.layout import discover_layout


@dataclass(frozen=True)
class Calibration:
    """block name -> mean |input of the FFN down projection| per intermediate neuron (float64)."""

    ffn_activation: Mapping[str, np.ndarray] = field(default_factory=dict)


@torch.no_grad()
def collect_calibration(model: nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray,
                        batch_size: int = 16) -> Calibration:
    layout = discover_layout(model)
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    current_mask: list[torch.Tensor] = []

    def recorder(block_name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            values = inputs[0].detach().abs().double() * current_mask[0]
            sums[block_name] = sums.get(block_name, 0) + values.reshape(-1, values.shape[-1]).sum(0)
        return hook

    for block in layout.blocks:
        if block.ffn_down:
            hooks.append(model.get_submodule(block.ffn_down[0]).register_forward_hook(recorder(block.name)))
    tokens = 0
    try:
        for start in range(0, len(input_ids), batch_size):
            ids = torch.from_numpy(input_ids[start:start + batch_size])
            mask = torch.from_numpy(attention_mask[start:start + batch_size])
            current_mask[:] = [mask.unsqueeze(-1).double()]
            model(input_ids=ids, attention_mask=mask)
            tokens += int(mask.sum())
    finally:
        for hook in hooks:
            hook.remove()
    return Calibration({name: (total / max(tokens, 1)).numpy() for name, total in sums.items()})
