"""Apply a chosen plan to a new checkpoint of the same architecture, and measure it.

For when production retrains the model: the plan (a front point's ``plan.json``) names modules
and fractions, not weights, so it compresses a retrained checkpoint of the same layout. The result
is built, scored on the task and timed like a trial (in the 4-bit kernel modes measured on this
machine, as a search measures them), and written with its figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from torch import nn

from slimtune.config import Config
from slimtune.evaluators.hardware import current_target
from slimtune.evaluators.latency import latency_inputs
from slimtune.evaluators.node_lock import NodeLock
from slimtune.export.modes import EXACT
from slimtune.files import staged_folder
from slimtune.phases import Phase, phases_on
from slimtune.plan import CompressionPlan, PlanError
from slimtune.search.measure import PlanInputs, measure_plan
from slimtune.search.trial import task_calibration


def read_plan(path: Path) -> CompressionPlan:
    if not path.is_file():
        raise PlanError(f"plan file {path} does not exist: give a plan.json from a search's plans/ or an export")
    try:
        return CompressionPlan.loads(path.read_text())
    except (ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"{path} is not a compression plan ({exc}): give a plan.json written by slimtune") from exc


def check_plan_fits(plan: CompressionPlan, model: nn.Module) -> None:
    """Every module the plan names must exist in ``model`` with the kind of layer the plan expects."""
    modules = dict(model.named_modules())
    named = set(plan.quantize) | set(plan.low_rank) | set(plan.ffn_prune) | set(plan.head_prune) | set(plan.depth_prune)
    missing = sorted(name for name in named if name not in modules)
    if missing:
        raise PlanError(f"the plan names {len(missing)} modules this model does not have (e.g. {missing[:3]}): it was "
                        "made for another architecture or layout; search this model instead")
    wrong = sorted(name for name in plan.low_rank if not isinstance(modules[name], nn.Linear))
    if wrong:
        raise PlanError(f"the plan factorises {wrong[:3]}, which are not Linear layers in this model: search it instead")


@dataclass(frozen=True)
class AppliedPlan:
    """The written folder, the measured figures (units in their names) and the task's searched metric."""

    folder: Path
    figures: dict[str, float]
    metric: str


def apply_plan(plan_path: Path, model_name: str, config: Config, out: Path, results: Path,
               console: Console | None = None) -> AppliedPlan:
    """Compress ``model_name`` with the plan, score and time it on ``config``'s task; write ``out``."""
    from slimtune.prepare import machine_kernel_modes, prepare

    console = console or Console(quiet=True)
    if out.exists():
        raise PlanError(f"{out} already exists: choose another --out or remove it")
    plan = read_plan(plan_path)
    config = config.model_copy(update={"model": config.model.model_copy(update={"name": model_name})})
    prepared = prepare(config, results, phases_on(console))
    for line in prepared.findings():
        console.print(line)
    model, task = prepared.loaded.module, prepared.task
    check_plan_fits(plan, model)
    feeds = latency_inputs(task.input_ids, task.attention_mask, config.latency)
    machine_modes = machine_kernel_modes(prepared, results, phases_on(console))
    inputs = PlanInputs(model=model, task=task, calibration=task_calibration(model, task), feeds=feeds,
                        modes=machine_modes.modes if machine_modes else EXACT)
    with staged_folder(out) as staging:
        with Phase(console, f"applying the plan to {model_name} and measuring it"):
            measured = measure_plan(inputs, plan, staging / "model.onnx", config.latency, config.latency.threads,
                                    NodeLock())
        figures = {k: v for k, v in measured.items() if isinstance(v, float)}
        (staging / "plan.json").write_text(plan.dumps() + "\n")
        (staging / "metrics.json").write_text(json.dumps({
            "model": model_name, "task_kind": task.kind, "metric": task.metric, "figures": figures,
            "fp32_torch_figures": task.reference, "hardware": current_target().as_dict(),
            "kernels": json.loads(measured["kernels"]), "kernel_modes": json.loads(measured["kernel_modes"])},
            indent=1, sort_keys=True) + "\n")
    return AppliedPlan(out, figures, task.metric)
