"""Activation statistics of the uncompressed model that make structural methods activation-aware.

One forward pass over a few training texts (padding tokens excluded) records:

* ``ffn_activation``: per FFN neuron, the mean absolute value it feeds into the down projection.
  A neuron's importance is that mean times the norm of its down-projection column: the typical
  size of what it adds to the residual stream (Minitron-style width pruning).
* ``block_importance``: per transformer block, 1 - the mean cosine similarity between the hidden
  state entering and leaving it (the "block influence" of ShortGPT): blocks that barely change
  their input are the first ones depth pruning removes.
* ``head_importance``: per transformer block, one score per attention head group (a head, or a
  key/value group under grouped-query attention): the mean over tokens of the L2 norm of the
  group's contribution to the output projection (``heads.py`` ranks heads by it).

The texts themselves are kept (``input_ids``, ``attention_mask``) for methods that need
activations of an already-transformed model (activation-aware low-rank). Computed once per
worker, reused by every trial; the same texts give the same statistics, so plans still rebuild
to the same bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from slimtune.layout import discover_layout
from slimtune.plan import PlanError
from slimtune.transforms.heads import AttentionRoles, attention_roles, group_contributions


@dataclass(frozen=True)
class Calibration:
    """Statistics keyed by module names of the uncompressed model (float64 arrays, fractions)."""

    ffn_activation: Mapping[str, np.ndarray] = field(default_factory=dict)
    block_importance: Mapping[str, float] = field(default_factory=dict)
    input_ids: np.ndarray | None = None
    attention_mask: np.ndarray | None = None
    # The task's training texts (int64 tokens) and the uncompressed model's outputs for them (float32
    # embeddings or logits), for distillation recovery; set by whoever prepared the task.
    training_ids: np.ndarray | None = None
    training_mask: np.ndarray | None = None
    training_targets: np.ndarray | None = None
    head_importance: Mapping[str, np.ndarray] = field(default_factory=dict)

    def blocks_by_importance(self) -> tuple[str, ...]:
        """Block names, the one whose removal changes the hidden state least first (ties: later block first)."""
        return tuple(name for name, _ in sorted(self.block_importance.items(),
                                                key=lambda item: (item[1], -_index(item[0]))))

    def least_important_blocks(self, count: int) -> tuple[str, ...]:
        """The ``count`` blocks depth pruning removes first, in model order."""
        return tuple(sorted(self.blocks_by_importance()[:count], key=_index))

    def with_training(self, ids: np.ndarray | None, mask: np.ndarray | None,
                      targets: np.ndarray | None) -> Calibration:
        """These statistics with the task's training texts and targets (what recovery distils on)."""
        return dataclasses.replace(self, training_ids=ids, training_mask=mask, training_targets=targets)

    def without_training(self) -> Calibration:
        """These statistics alone: what a driver sends to workers that hold the training texts already."""
        return self.with_training(None, None, None)


def _index(block_name: str) -> int:
    tail = block_name.rpartition(".")[2]
    return int(tail) if tail.isdigit() else 0


def _hidden_of(value) -> torch.Tensor:
    """The hidden-state tensor of a block's input or output (blocks return tensors or tuples)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find the hidden state in a block output of type {type(value).__name__}")


class BatchDone(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a forward hook once a batch has given every statistic asked of it: the rest of
    that batch's forward pass (the layers after the last hooked one) is skipped."""


@torch.no_grad()
def run_masked_batches(model: nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray,
                       hooks: list, current_mask: list[torch.Tensor], batch_size: int = 16) -> int:
    """Run ``model`` over the texts in batches, then remove ``hooks``; returns the non-padding tokens.

    While a batch runs, ``current_mask[0]`` holds its attention mask as float64 (batch, sequence),
    so forward hooks can leave padding tokens out of their statistics; a hook that raises
    ``BatchDone`` ends the batch's pass there.
    """
    tokens = 0
    try:
        for start in range(0, len(input_ids), batch_size):
            ids = torch.from_numpy(input_ids[start:start + batch_size])
            mask = torch.from_numpy(attention_mask[start:start + batch_size])
            current_mask[:] = [mask.double()]
            try:
                model(input_ids=ids, attention_mask=mask)
            except BatchDone:
                pass
            tokens += int(mask.sum())
    finally:
        for hook in hooks:
            hook.remove()
    return tokens


@torch.no_grad()
def collect_calibration(model: nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray,
                        batch_size: int = 16) -> Calibration:
    layout = discover_layout(model)
    sums: dict[str, torch.Tensor] = {}
    cosines: dict[str, float] = {}
    entering: dict[str, torch.Tensor] = {}
    hooks = []
    current_mask: list[torch.Tensor] = []
    head_sums: dict[str, torch.Tensor] = {}

    def head_recorder(block_name: str, roles: AttentionRoles):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            contributions = group_contributions(inputs[0], module.weight, roles, current_mask[0])
            head_sums[block_name] = head_sums.get(block_name, 0) + contributions
        return hook

    def ffn_recorder(block_name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            values = inputs[0].detach().abs().double() * current_mask[0][..., None]
            sums[block_name] = sums.get(block_name, 0) + values.reshape(-1, values.shape[-1]).sum(0)
        return hook

    def block_entry(block_name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            entering[block_name] = _hidden_of(args[0] if args else kwargs["hidden_states"])
        return hook

    def block_exit(block_name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            before, after = entering.pop(block_name).double(), _hidden_of(output).double()
            cosine = nn.functional.cosine_similarity(before, after, dim=-1) * current_mask[0]
            cosines[block_name] = cosines.get(block_name, 0.0) + float(cosine.sum())
        return hook

    for block in layout.blocks:
        module = model.get_submodule(block.name)
        hooks.append(module.register_forward_pre_hook(block_entry(block.name), with_kwargs=True))
        hooks.append(module.register_forward_hook(block_exit(block.name), with_kwargs=True))
        if block.ffn_down:
            hooks.append(model.get_submodule(block.ffn_down[0]).register_forward_hook(ffn_recorder(block.name)))
        try:
            roles = attention_roles(model, block, layout.hidden_size)
        except PlanError:  # attention that cannot be pruned by head (fused qkv): no scores
            pass
        else:
            hooks.append(model.get_submodule(roles.output).register_forward_hook(head_recorder(block.name, roles)))
    tokens = run_masked_batches(model, input_ids, attention_mask, hooks, current_mask, batch_size)
    return Calibration(
        ffn_activation={name: (total / max(tokens, 1)).numpy() for name, total in sums.items()},
        block_importance={name: 1.0 - total / max(tokens, 1) for name, total in cosines.items()},
        input_ids=input_ids, attention_mask=attention_mask,
        head_importance={name: (total / max(tokens, 1)).numpy() for name, total in head_sums.items()},
    )
