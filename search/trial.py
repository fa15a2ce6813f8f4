"""One trial: params -> plan -> artifact -> measured metrics. Runs inside a Ray worker.

Each worker process loads the model and the prepared task once and reuses them for every trial it
runs. Identical plans (NSGA-II proposes repeats) are measured once: results are cached in the
search's work folder under a key of everything that changes them (the plan, the model's files, the
prepared task's bytes, the latency settings and threads, the hardware target), written atomically;
artifacts are built under a name of their own and renamed into place, so workers measuring the
same plan at once never write the same file. A trial that raises, or measures a non-finite
figure, fails loudly so that Ray, Optuna and MLflow all record it as failed. Measuring itself is
``slimtune.search.measure``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimtune.config import BLOCKWISE_FORMATS, WEIGHT_FORMAT_BITS, Config, LatencyConfig
from slimtune.evaluators.hardware import HardwareTarget, fingerprint
from slimtune.evaluators.kernel_modes import measured_modes, modes_key, read_modes_record
from slimtune.evaluators.latency import latency_inputs
from slimtune.evaluators.node_lock import NodeLock
from slimtune.export.modes import EXACT, KernelModes
from slimtune.export.size import file_sha256
from slimtune.files import write_atomically
from slimtune.layout import ModelLayout, discover_layout
from slimtune.model import load_model
from slimtune.plan import CompressionPlan, RecoverySpec
from slimtune.search.measure import PlanInputs, measure_plan
from slimtune.search.shipping import Shipment, inputs_fingerprints, node_work_dir, unpack
from slimtune.spaces import SearchSpace
from slimtune.tasks import PreparedTask
from slimtune.transforms import Calibration, collect_calibration
from slimtune.transforms.heads import head_groups


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
    # Kernel modes the driver measured on its machine before the search (``prepare.machine_kernel_modes``):
    # (modes key, ``kernel_modes.modes_record``). A worker whose key is here takes them instead of measuring.
    known_modes: tuple[tuple[str, str], ...] = ()
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
    """What a worker loads once: what measuring needs (``inputs``, built with exact kernel modes;
    a trial sets the node's), the search space, and ``inputs_fingerprint``: the model's files and
    the prepared task's bytes."""

    inputs: PlanInputs
    space: SearchSpace
    inputs_fingerprint: str = ""


def recovery_spec(config: Config) -> RecoverySpec:
    """The distillation recipe of a search, seeded by the search's seed."""
    cfg = config.recovery
    return RecoverySpec(steps=cfg.steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                        hidden_weight=cfg.hidden_weight, seed=config.search.seed, flat_patience=cfg.flat_patience)


def with_task_training(calibration: Calibration, task: PreparedTask) -> Calibration:
    """``calibration`` with the task's training texts and the uncompressed model's targets on them."""
    return calibration.with_training(task.train_ids, task.train_mask, task.train_targets)


def task_calibration(model: torch.nn.Module, task: PreparedTask) -> Calibration:
    """Activation statistics on the task's calibration texts, plus its training texts for recovery."""
    return with_task_training(collect_calibration(model, task.calibration_ids, task.calibration_mask), task)


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
    calibration = (with_task_training(ctx.calibration, task) if ctx.calibration is not None
                   else task_calibration(model, task))
    shipped = ctx.shipment
    model_fp, task_fp = ((shipped.model_fingerprint, shipped.task_fingerprint) if shipped
                         else inputs_fingerprints(source, task_path.read_bytes()))
    return WorkerState(
        inputs=PlanInputs(model=model, task=task, calibration=calibration,
                          feeds=latency_inputs(task.input_ids, task.attention_mask, ctx.config.latency)),
        space=make_space(ctx.config, model, calibration, ctx.excluded),
        inputs_fingerprint=fingerprint(model_fp, task_fp),
    )


def search_bit_widths(config: Config) -> tuple[int, ...]:
    """The blockwise (MatMulNBits) bit widths a search's space offers, widest first."""
    return tuple(sorted({WEIGHT_FORMAT_BITS[f] for f in config.space.weight_formats if f in BLOCKWISE_FORMATS},
                        reverse=True))


def plan_bit_widths(plan: CompressionPlan, layout: ModelLayout) -> tuple[int, ...]:
    """The blockwise bit widths ``plan`` stores Linear weights at (MatMulNBits): its artifact's bytes
    depend on the kernel modes of these alone (none: the modes change nothing). A 4-bit lookup table
    (GatherBlockQuantized) is built the same in any mode, so it does not wait for them."""
    tables = {layout.embedding, *layout.other_tables}
    return tuple(sorted({spec.bits for name, spec in plan.quantize.items() if spec.is_blockwise and name not in tables}))


@functools.lru_cache(maxsize=2)
def trial_modes(ctx: TrialContext, lock_path: str) -> tuple[KernelModes, tuple[dict, ...]]:
    """This node's kernel modes for the search's blockwise formats (``slimtune.evaluators.kernel_modes``):
    the ones the driver measured before the search when they are this node's (``known_modes``, a
    local search), else measured once per search and hardware target by one worker (the others
    wait for it), timed under the node's exclusive lock, and cached. Asked for by the first trial
    whose plan has blockwise weights: the trials before it do not wait."""
    state = worker_state(ctx)
    inputs, config = state.inputs, ctx.config
    widths = search_bit_widths(config)
    key = modes_key(inputs.hardware, state.inputs_fingerprint, widths, config.space.block_sizes[0], config.latency)
    known = dict(ctx.known_modes).get(key)
    if known is not None:
        modes, figures = read_modes_record(known)
        return modes, tuple(figures)
    modes, figures = measured_modes(inputs.model, inputs.task, state.space.layout.linears, widths,
                                    config.space.block_sizes[0], inputs.feeds, config.latency, config.latency.threads,
                                    ctx.trial_dir / "kernel-modes" / f"{key}.json", lock=NodeLock(Path(lock_path)))
    return modes, tuple(figures)


def measure_modes_on_node(ctx: TrialContext) -> None:
    """This node's kernel modes for the search (``trial_modes``), measured as a Ray task started
    with the search (``runner.start_kernel_modes``): the first trials (the reference points, which
    need no modes) run meanwhile, and a later trial with blockwise weights finds them measured
    instead of waiting with its slot idle."""
    torch.set_num_threads(build_threads(ctx.config))
    with NodeLock(Path(ctx.lock_path)).shared():  # loading is heavy work: not while a trial times
        worker_state(ctx)
    trial_modes(ctx, ctx.lock_path)


def build_threads(config: Config) -> int:
    """The torch threads a trial builds with (and ONNX Runtime scores with): the CPUs Ray reserves
    for it. Front recovery runs its trials with every core reserved."""
    return max(1, int(config.search.cpus_per_trial))


def measurement_key(plan: CompressionPlan, inputs_fingerprint: str, hardware: HardwareTarget, modes: KernelModes,
                    latency_cfg: LatencyConfig, threads: int) -> str:
    """Everything a measurement depends on, as one digest: a cached result is reused only when all
    match (``inputs_fingerprint``: the model's files and the task's bytes)."""
    return fingerprint(plan.digest, inputs_fingerprint, latency_cfg.model_dump_json(), str(threads), hardware.key,
                       modes.dumps())


def run_trial(params: dict[str, Any], ctx: TrialContext) -> dict[str, Any]:
    """Measure the plan that ``params`` (sampled by Optuna) describe; cached by ``measurement_key``."""
    began, started = time.time(), time.perf_counter()
    threads = build_threads(ctx.config)
    torch.set_num_threads(threads)
    lock = NodeLock(Path(ctx.lock_path))
    with lock.shared():  # loading and calibrating is heavy work too
        state = worker_state(ctx)
    load_s = time.perf_counter() - started  # the worker's first trial loads the model and the task
    plan = state.space.plan_from_choices(params)
    modes, mode_figures = trial_modes(ctx, ctx.lock_path) if plan_bit_widths(plan, state.space.layout) else (EXACT, ())
    inputs = dataclasses.replace(state.inputs, modes=modes)
    key = measurement_key(plan, state.inputs_fingerprint, inputs.hardware, modes, ctx.config.latency, threads)
    cached = ctx.cache_dir / f"{key}.json"
    if cached.is_file():
        result = {**json.loads(cached.read_text()), "cached": 1}
    else:
        building = ctx.artifacts_dir / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.onnx"
        result = {**measure_plan(inputs, plan, building, ctx.config.latency, threads, lock, ctx.config.search,
                                 ctx.cache_dir), "cached": 0}
        path = building.with_name(f"{key}.onnx")
        building.replace(path)
        result["artifact"] = str(path)
        result["artifact_sha256"] = file_sha256(path)
        result["build_threads"] = threads  # a rebuild reads them back: the bytes can depend on them
        write_atomically(cached, json.dumps(result))
    # Wall-clock bounds (epoch s) of the trial: a search's throughput and idle time are read from them.
    return {**result, "plan_digest": plan.digest, "measurement_key": key, "trial_s": time.perf_counter() - started,
            "load_s": load_s,
            "kernel_mode_figures": json.dumps(mode_figures),
            "started_at": began, "finished_at": time.time()}
