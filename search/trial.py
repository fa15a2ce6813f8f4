"""One trial: params -> plan -> artifact -> measured metrics. Runs inside a Ray worker.

Each worker process loads the model and the prepared task once and reuses them for every trial it
runs. Identical plans (NSGA-II proposes repeats) are measured once: results are cached in the
search's work folder under a key of everything that changes them (the plan, the model's files, the
prepared task's bytes, the latency settings and threads, the hardware target), written atomically;
artifacts are built under a name of their own and renamed into place, so workers measuring the
same plan at once never write the same file. A trial that raises, or measures a non-finite
figure, fails loudly so that Ray, Optuna and MLflow all record it as failed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtune.config import METRIC_GOALS, Config, LatencyConfig, SearchConfig
from slimtune.evaluators import as_dict
from slimtune.evaluators.hardware import HardwareTarget, current_target, fingerprint
from slimtune.evaluators.kernel_modes import measured_modes
from slimtune.evaluators.latency import latency_inputs, measure_latency
from slimtune.evaluators.node_lock import NodeLock
from slimtune.evaluators.quality import StagedQuality
from slimtune.evaluators.size import measure_size
from slimtune.export import build_artifact
from slimtune.export.modes import EXACT, KernelModes
from slimtune.export.quantize import BLOCKWISE_BITS
from slimtune.export.size import file_sha256
from slimtune.layout import discover_layout
from slimtune.model import load_model
from slimtune.plan import CompressionPlan, RecoverySpec
from slimtune.search.shipping import Shipment, inputs_fingerprints, node_work_dir, unpack
from slimtune.spaces import SearchSpace
from slimtune.tasks import PreparedTask
from slimtune.transforms import Calibration, collect_calibration
from slimtune.transforms.heads import head_groups

SCREEN_MIN_TEXTS = 50  # staged scoring needs a sample that says something: smaller held-out sets are scored whole
class NonFiniteMetricError(FloatingPointError):
    """A measured objective is NaN or infinite; the trial is failed rather than reported."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares; small and picklable, sent to each Ray worker.

    ``config`` is resolved: its ``task.kind`` and ``task.metric`` are the ones the task was prepared with.
    """

    config: Config
    model_source: str
    task_path: str
    work_dir: str
    lock_path: str
    shipment: Shipment | None = None
    excluded: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # options the sensitivity profile narrowed away
    # The driver's activation statistics (``task_calibration`` less its training texts, which every
    # worker has in the task): workers skip measuring them again. Not part of the context's identity.
    calibration: Calibration | None = field(default=None, compare=False, hash=False)

    @property
    def trial_dir(self) -> Path:
        """Where this node keeps measured results and artifacts: a node-local folder when the inputs
        were shipped through Ray (a cluster), else the search's work folder."""
        return node_work_dir(self.shipment.search_id) if self.shipment else Path(self.work_dir)

    @property
    def artifacts_dir(self) -> Path:
        return self.trial_dir / "artifacts"

    @property
    def cache_dir(self) -> Path:
        return self.trial_dir / "measured"

    def inputs(self) -> tuple[str, Path]:
        """(model source, task file) on this node: unpacked from the shipment when there is one."""
        return unpack(self.shipment) if self.shipment else (self.model_source, Path(self.task_path))


@dataclass(frozen=True)
class WorkerState:
    """What a worker loads once. ``inputs_fingerprint``: the model's files and the prepared task's bytes;
    ``modes``: how this node runs the blockwise kernels (``trial_modes``)."""

    model: torch.nn.Module
    space: SearchSpace
    task: PreparedTask
    feeds: dict[str, np.ndarray]
    calibration: Calibration
    inputs_fingerprint: str = ""
    hardware: HardwareTarget = field(default_factory=current_target)
    modes: KernelModes = EXACT


def recovery_spec(config: Config) -> RecoverySpec:
    """The distillation recipe of a search, seeded by the search's seed."""
    cfg = config.recovery
    return RecoverySpec(steps=cfg.steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                        hidden_weight=cfg.hidden_weight, seed=config.search.seed, flat_patience=cfg.flat_patience)


def task_calibration(model: torch.nn.Module, task: PreparedTask) -> Calibration:
    """Activation statistics on the task's calibration texts, plus its training texts for recovery."""
    calibration = collect_calibration(model, task.calibration_ids, task.calibration_mask)
    return dataclasses.replace(calibration, training_ids=task.train_ids, training_mask=task.train_mask,
                               training_targets=task.train_targets)


def make_space(config: Config, model: torch.nn.Module, calibration: Calibration,
               excluded: tuple[tuple[str, tuple[Any, ...]], ...] = ()) -> SearchSpace:
    """The search space of ``model``: what its layout, block importance and attention allow, less
    the ``excluded`` options."""
    return SearchSpace(discover_layout(model), config.space, block_order=calibration.blocks_by_importance(),
                       head_groups=head_groups(model), recovery=recovery_spec(config),
                       recover_in_trials=config.recovery.mode == "trials", excluded=dict(excluded))


@functools.lru_cache(maxsize=2)
def worker_state(ctx: TrialContext) -> WorkerState:
    source, task_path = ctx.inputs()
    task = PreparedTask.load(task_path)
    model = load_model(source, classification_head=task.output.kind == "logits", causal_lm=task.output.kind == "lm").module
    calibration = (dataclasses.replace(ctx.calibration, training_ids=task.train_ids, training_mask=task.train_mask,
                                       training_targets=task.train_targets)
                   if ctx.calibration is not None else task_calibration(model, task))
    shipped = ctx.shipment
    model_fp, task_fp = ((shipped.model_fingerprint, shipped.task_fingerprint) if shipped
                         else inputs_fingerprints(source, task_path.read_bytes()))
    return WorkerState(
        model=model,
        space=make_space(ctx.config, model, calibration, ctx.excluded),
        task=task,
        feeds=latency_inputs(task.input_ids, task.attention_mask, ctx.config.latency),
        calibration=calibration,
        inputs_fingerprint=fingerprint(model_fp, task_fp),
    )


def search_bit_widths(config: Config) -> tuple[int, ...]:
    """The blockwise (MatMulNBits) bit widths a search's space offers, widest first."""
    return tuple(sorted({BLOCKWISE_BITS[f] for f in config.space.weight_formats if f in BLOCKWISE_BITS}, reverse=True))


def plan_bit_widths(plan: CompressionPlan) -> tuple[int, ...]:
    """The blockwise bit widths ``plan`` stores weights at: its artifact's bytes depend on the kernel
    modes of these alone (none: the modes change nothing)."""
    return tuple(sorted({BLOCKWISE_BITS[spec.format] for spec in plan.quantize.values() if spec.is_blockwise}))


@functools.lru_cache(maxsize=2)
def trial_modes(ctx: TrialContext, lock_path: str) -> tuple[KernelModes, tuple[dict, ...]]:
    """This node's kernel modes for the search's blockwise formats (``slimtune.evaluators.kernel_modes``),
    measured once per search and hardware target by one worker (the others wait for it), timed
    under the node's exclusive lock, and cached. Asked for by the first trial whose plan has
    blockwise weights: the trials before it do not wait."""
    state = worker_state(ctx)
    config = ctx.config
    widths = search_bit_widths(config)
    # Not keyed by the trial's build threads (front recovery uses more): the modes are timed at the latency's.
    key = fingerprint(state.hardware.key, state.inputs_fingerprint, str(widths), str(config.space.block_sizes[0]),
                      config.latency.model_dump_json())
    modes, figures = measured_modes(state.model, state.task, state.space.layout.linears, widths,
                                    config.space.block_sizes[0], state.feeds, config.latency, config.latency.threads,
                                    ctx.trial_dir / "kernel-modes" / f"{key}.json", lock=NodeLock(Path(lock_path)))
    return modes, tuple(figures)


def measurement_key(state: WorkerState, plan: CompressionPlan, latency_cfg: LatencyConfig, threads: int) -> str:
    """Everything a measurement depends on, as one digest: a cached result is reused only when all match."""
    return fingerprint(plan.digest, state.inputs_fingerprint, latency_cfg.model_dump_json(), str(threads),
                       state.hardware.key, state.modes.dumps())


def write_atomically(path: Path, text: str) -> None:
    """Write under a name of this writer's own, then rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def dominating_point(measured_dir: Path, goal: str, screen_score: float, texts: int, latency_ms: float,
                     size_mb: float, margin: float, hardware: str) -> str | None:
    """The measured result (file stem) in ``measured_dir`` that dominates a candidate for sure, if any:
    on the same hardware, at most as slow and as large, and better on the same sampled texts by more
    than ``margin`` (a fraction of its score). None when no measured point does."""
    for path in sorted(measured_dir.glob("*.json")):
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if other.get("hardware") != hardware or other.get("screen_texts") != texts:
            continue
        theirs = float(other["screen_score"])
        better = screen_score < theirs - margin * abs(theirs) if goal == "max" else \
            screen_score > theirs + margin * abs(theirs)
        if better and other["latency_ms"] <= latency_ms and other["size_mb"] <= size_mb:
            return path.stem
    return None


def measure_plan(state: WorkerState, plan: CompressionPlan, path: Path, latency_cfg: LatencyConfig,
                 threads: int, lock: NodeLock, search: SearchConfig | None = None,
                 measured_dir: Path | None = None) -> dict[str, Any]:
    """Build the artifact for ``plan`` at ``path`` and measure it: metrics, timings (s), kernels.

    Staged scoring (``search.screen_fraction`` below 1 and a ``measured_dir`` of this search's
    results): the task's metric on a seeded sample of the held-out texts first (``screen_score``),
    then latency and size; the remaining texts are scored unless a measured point already
    dominates the candidate (``dominating_point``), in which case the sample's figures are its
    quality figures, ``quality_texts`` says how many texts, ``screened`` is 1 and ``screened_by``
    is that point's measurement key.
    Building holds ``lock`` shared stage by stage, scoring (``threads`` ORT threads) batch by batch;
    latency holds it exclusively. Timings: ``compress_s``, ``export_s``, ``quantize_s``, ``recover_s`` (the
    artifact's build), ``quality_s`` (scoring), ``latency_s`` (timing), ``wait_s`` (waiting for the lock).
    """
    task = state.task
    total = len(task.input_ids)
    fraction = search.screen_fraction if search is not None and measured_dir is not None else 1.0
    first = task.sample_rows(max(SCREEN_MIN_TEXTS, math.ceil(fraction * total)), seed=0)
    timings = {"wait_s": 0.0, "quality_s": 0.0}
    waited = time.perf_counter()
    artifact = build_artifact(state.model, plan, path, state.calibration, task.output, hold=lock.shared,
                              modes=state.modes)
    timings["wait_s"] += time.perf_counter() - waited - artifact.build_s  # stage by stage, under the lock
    started = time.perf_counter()
    quality = StagedQuality(path, task, threads, first, hold=lock.shared)  # held batch by batch
    sampled = as_dict(quality.first_stage())
    timings["quality_s"] += time.perf_counter() - started
    waited = time.perf_counter()
    with lock.exclusive():
        timings["wait_s"] += time.perf_counter() - waited
        started = time.perf_counter()
        latency = as_dict(measure_latency(path, state.feeds, latency_cfg))
        timings["latency_s"] = time.perf_counter() - started
    size = as_dict(measure_size(path))
    screened = None
    if len(first) < total:
        screened = dominating_point(measured_dir, METRIC_GOALS[task.metric], sampled[task.metric], len(first),
                                    latency["latency_ms"], size["size_mb"], search.screen_margin, state.hardware.key)
    if screened is None:
        started = time.perf_counter()
        scored = as_dict(quality.full())
        timings["quality_s"] += time.perf_counter() - started
    else:
        scored = sampled
    metrics = {**scored, **latency, **size}
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        raise NonFiniteMetricError(f"non-finite {', '.join(bad)} for plan {plan.digest}")
    return {
        **metrics, "compress_s": artifact.compress_s, "export_s": artifact.export_s,
        "quantize_s": artifact.quantize_s, "recover_s": artifact.recover_s, "recover_steps": artifact.recover_steps,
        **timings,
        "screen_score": sampled[task.metric], "screen_texts": len(first),
        "quality_texts": len(first) if screened else total, "screened": int(screened is not None),
        "screened_by": screened or "",
        "kernels": json.dumps(artifact.matmul_kernels, sort_keys=True), "exporter": artifact.exporter,
        "kernel_modes": state.modes.dumps(),
        "artifact": str(path),
        "hardware": state.hardware.key, "node": state.hardware.node,
    }


def run_trial(params: dict[str, Any], ctx: TrialContext) -> dict[str, Any]:
    """Measure the plan that ``params`` (sampled by Optuna) describe; cached by ``measurement_key``."""
    began, started = time.time(), time.perf_counter()
    torch.set_num_threads(max(1, int(ctx.config.search.cpus_per_trial)))
    lock = NodeLock(Path(ctx.lock_path))
    with lock.shared():  # loading and calibrating is heavy work too
        state = worker_state(ctx)
    plan = state.space.plan_from_choices(params)
    modes, mode_figures = trial_modes(ctx, ctx.lock_path) if plan_bit_widths(plan) else (EXACT, ())
    state = dataclasses.replace(state, modes=modes)
    threads = max(1, int(ctx.config.search.cpus_per_trial))
    key = measurement_key(state, plan, ctx.config.latency, threads)
    cached = ctx.cache_dir / f"{key}.json"
    if cached.is_file():
        result = {**json.loads(cached.read_text()), "cached": 1}
    else:
        building = ctx.artifacts_dir / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.onnx"
        result = {**measure_plan(state, plan, building, ctx.config.latency, threads, lock, ctx.config.search,
                                 ctx.cache_dir), "cached": 0}
        path = building.with_name(f"{key}.onnx")
        building.replace(path)
        result["artifact"] = str(path)
        result["artifact_sha256"] = file_sha256(path)
        write_atomically(cached, json.dumps(result))
    # Wall-clock bounds (epoch s) of the trial: a search's throughput and idle time are read from them.
    return {**result, "plan_digest": plan.digest, "measurement_key": key, "trial_s": time.perf_counter() - started,
            "kernel_mode_figures": json.dumps(mode_figures),
            "started_at": began, "finished_at": time.time()}
