"""Distillation recovery: the compressed model learns back from the uncompressed one.

The recipe of DistilBERT and NVIDIA's Minitron: prune, then distill from the original. The
teacher is the uncompressed model, the student the pruned / factorised model in torch, before
export and quantization. The loss matches what ships: the pooled sentence embedding (MSE +
1 - cosine), a classifier's logits (KL divergence of the softened class distributions), or a
language model's next-token logits at every position (the same KL, per token), plus
``hidden_weight`` x MSE of the last hidden states where the user asks for it. It trains on the
task's training texts, no labels: ``steps`` AdamW steps of ``batch_size`` texts, in an order fixed
by ``seed``; each batch is cut to its longest text. A recovery whose loss has stopped falling ends
early (``RecoverySpec.flat_patience``, ``FlatLoss``): the rule reads only the losses, so the
rebuild at export stops at the same step.

Two things keep a recovery cheap: the teacher's outputs for the training texts are
computed once when the task is prepared and passed in as ``targets`` (no teacher forward pass per
step unless hidden states are matched too), and the input lookup tables (token, position, type
embeddings: half of a small encoder's weights) stay frozen: pruning changed the blocks, and the
blocks are what learn to work with their new neighbours.

Measured on the default model and task (``benchmarks/toolbox.py``): int8 with 2 of 6 blocks removed,
0.9461 accuracy before, 0.9753 (= fp32) after 120 steps of 16 texts. On a plan that stacks depth,
head, FFN and rank pruning with 4-bit weights (0.114x fp32 size), learning rates of 5e-5 / 1e-4 /
2e-4 at 120 steps gave 0.9461 / 0.9596 / 0.9663, and 1e-4 at 240 steps 0.9708: hence the
default 1e-4 (``RecoverySpec``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import numpy as np
import torch
from torch import nn

from slimtune.model import OutputSpec, wrap_output
from slimtune.plan import CompressionPlan, PlanError, RecoverySpec
from slimtune.transforms.calibration import Calibration


def _batches(count: int, spec: RecoverySpec) -> list[np.ndarray]:
    """Indices of each step's texts: seeded permutations, one epoch after another."""
    rng = np.random.default_rng(spec.seed)
    order = np.concatenate([rng.permutation(count) for _ in range(spec.steps * spec.batch_size // count + 1)])
    return [order[i * spec.batch_size:(i + 1) * spec.batch_size] for i in range(spec.steps)]


def _trainable(student: nn.Module) -> list[nn.Parameter]:
    """Every parameter except the input lookup tables (frozen, see the module docstring)."""
    tables = {id(p) for m in student.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return [p for p in student.parameters() if id(p) not in tables]


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE + (1 - cosine) between pooled embeddings: their size and their direction."""
    return (nn.functional.mse_loss(student, teacher)
            + (1 - nn.functional.cosine_similarity(student, teacher, dim=-1)).mean())


LOGITS_TEMPERATURE = 2.0


def logits_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL divergence of the softened class distributions (temperature 2, scaled by its square, as in
    DistilBERT): the student learns how the teacher ranks every class, not only its top one."""
    t = LOGITS_TEMPERATURE
    return nn.functional.kl_div(nn.functional.log_softmax(student / t, dim=-1),
                                nn.functional.softmax(teacher / t, dim=-1), reduction="batchmean") * t * t


def next_token_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``logits_loss`` over every position of every window: (batch, positions, vocab) -> one mean (Minitron's
    logit distillation of a language model)."""
    return logits_loss(student.flatten(0, -2), teacher.flatten(0, -2))


LOSSES = {"embedding": embedding_loss, "logits": logits_loss, "lm": next_token_loss}

StepReport = Callable[[int, int, float, float], None]
"""(steps done, steps planned, this step's loss, seconds left at the pace so far)."""
_STEP_REPORT: ContextVar[StepReport | None] = ContextVar("slimtune_distill_step_report", default=None)
FLAT_GAIN = 0.01
"""A window of steps whose mean loss is not 1% below the best window's so far counts as flat."""


@contextlib.contextmanager
def reporting_steps(report: StepReport) -> Iterator[None]:
    """Within the block, every distillation step in this thread calls ``report`` (progress displays)."""
    token = _STEP_REPORT.set(report)
    try:
        yield
    finally:
        _STEP_REPORT.reset(token)


class FlatLoss:
    """Decides when a recovery's loss has stopped falling (``RecoverySpec.flat_patience``)."""

    def __init__(self, steps: int, patience: int) -> None:
        self.window, self.patience = max(10, steps // 10), patience
        self.losses: list[float] = []
        self.best = float("inf")
        self.flat = 0

    def stop_after(self, loss: float) -> bool:
        self.losses.append(loss)
        if not self.patience or len(self.losses) % self.window:
            return False
        mean = float(np.mean(self.losses[-self.window:]))
        self.flat = self.flat + 1 if mean > self.best * (1 - FLAT_GAIN) else 0
        self.best = min(self.best, mean)
        return self.flat >= self.patience


def distill(student: nn.Module, teacher: nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray,
            spec: RecoverySpec, targets: np.ndarray | None = None,
            output: OutputSpec = OutputSpec()) -> tuple[nn.Module, int]:
    """Train ``student`` (in place) to reproduce ``teacher``'s outputs; returns it in eval mode and
    the number of steps it took (fewer than ``spec.steps`` when the loss went flat or the budget ran out).

    ``output``: what is matched (pooled embeddings, or class logits), the function that ships.
    ``targets``: the teacher's outputs for ``input_ids`` (float32, one row per text), when already
    known; the teacher then runs only if hidden states are matched too. A language model's task
    keeps none (a window's logits are tens of MB): its teacher runs every step.
    """
    torch.manual_seed(spec.seed)
    wrapped_student, wrapped_teacher = wrap_output(student, output), wrap_output(teacher, output).eval()
    output_loss = LOSSES[output.kind]
    optimizer = torch.optim.AdamW(_trainable(student), lr=spec.learning_rate)
    student.eval()  # no dropout: a short, deterministic run
    report, flat, started = _STEP_REPORT.get(), FlatLoss(spec.steps, spec.flat_patience), time.monotonic()
    for step, rows in enumerate(_batches(len(input_ids), spec), start=1):
        mask = torch.from_numpy(attention_mask[rows])
        width = int(mask.sum(1).max())
        ids, mask = torch.from_numpy(input_ids[rows][:, :width]), mask[:, :width]
        with torch.no_grad():
            target = (teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
                      if spec.hidden_weight else None)
            target_output = (torch.from_numpy(targets[rows]) if targets is not None else wrapped_teacher(ids, mask))
        if spec.hidden_weight:
            outputs = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden, produced = outputs.hidden_states[-1], wrapped_student.read(outputs, mask)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            hidden_loss = (((hidden - target) ** 2) * weights).sum() / (weights.sum() * hidden.shape[-1])
        else:
            produced, hidden_loss = wrapped_student(ids, mask), 0.0
        loss = output_loss(produced, target_output) + spec.hidden_weight * hidden_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if report is not None:
            spent = time.monotonic() - started
            left = spent / step * (spec.steps - step)
            report(step, spec.steps, value, left if spec.budget_s is None else max(0.0, min(left, spec.budget_s - spent)))
        if flat.stop_after(value) or (spec.budget_s is not None and time.monotonic() - started >= spec.budget_s):
            break
    return student.eval(), step


def recover(original: nn.Module, transformed: nn.Module, plan: CompressionPlan,
            calibration: Calibration | None, output: OutputSpec = OutputSpec()) -> tuple[nn.Module, int]:
    """Apply ``plan.recovery`` to ``transformed`` with ``original`` as the teacher (no-op without it);
    returns the model and the distillation steps taken (0 without recovery)."""
    if plan.recovery is None:
        return transformed, 0
    texts = calibration.training_ids if calibration is not None else None
    if texts is None or calibration.training_mask is None:
        raise PlanError("the plan asks for distillation recovery, which needs the task's training texts "
                        "(Calibration.training_ids); build it with a prepared task")
    with torch.enable_grad():
        return distill(transformed, original, texts, calibration.training_mask, plan.recovery,
                       calibration.training_targets, output)
