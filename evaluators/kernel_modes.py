"""Measure the kernel modes of the blockwise formats on this hardware target, for this model.

For each bit width the space offers (4, 2), the model with every Linear at that width (round to
nearest, the space's first block size) is built once with zero points and once symmetric, and
each build is run at accuracy level 0 and 4 (the level set on the graph in memory): every mode is
timed as the search times it (the exact one first; a mode whose first runs are all no faster
stops there, ``latency.EARLY_RUNS``), then scored by the task's metric on a fixed sample of the
held-out texts, fastest first, only as far as the choice needs. ``EXACT`` (level 0, zero points)
is the reference; a mode holds quality when its metric is no worse than the reference's by more
than ``tolerance`` (a fraction of the reference's value); the fastest mode that holds it is kept,
so a mode slower than the exact one is never scored, and the scoring stops at the first faster
mode that holds. A mode ONNX Runtime refuses on this machine is left out. Units: ms (latency), the
metric's own.

Measured once per search and node (cached in the search's work folder, keyed by the hardware
target, the model and task, the formats and the latency settings), by one worker at a time (the
others wait for its result); only the timings hold the node's lock exclusively, the builds and the
scoring hold it shared, so other trials go on building meanwhile.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from slimtune.config import FORMAT_OF_BITS, METRIC_GOALS, LatencyConfig
from slimtune.errors import first_line
from slimtune.evaluators import as_dict
from slimtune.evaluators.hardware import HardwareTarget, fingerprint
from slimtune.evaluators.latency import measure_latency
from slimtune.evaluators.node_lock import NodeLock, exclusive_file
from slimtune.evaluators.quality import StagedQuality
from slimtune.export import build_artifact
from slimtune.export.modes import EXACT, KernelModes
from slimtune.files import write_atomically
from slimtune.plan import CompressionPlan, QuantSpec
from slimtune.tasks import PreparedTask

MODE_TOLERANCE = 0.01  # a mode may cost at most 1% of the exact mode's metric (perplexity +1%, accuracy -1%)
SAMPLE_TEXTS = 32
MODE_PRECISION = 0.05
"""How well a mode's median time must be known (a fraction of it, ``LatencyConfig.median_precision``):
modes closer than this run alike, so which of them is kept matters less than timing them longer.
The default model's four ran within 3% or 12% of each other on a 2-core AMD EPYC VM (avx2
avx512f avx512bw avx512_vnni), depending on the run; timing them took 6.0 s at 2% (modes at
157-162 ms) and 4.6 s at 5% (at 115-128 ms: the VM ran faster then, so part of the difference is
the machine's). On a CPU without VNNI, level 4's int8 compute may be far slower or faster than
level 0, and modes that far apart are ranked the same at either precision."""
CANDIDATES = ((0, False), (4, False), (0, True), (4, True))  # (accuracy level, symmetric); the first is exact



@dataclass(frozen=True)
class ModeFigures:
    """One measured mode of one bit width: its metric on the sample and its latency (ms).
    ``metric`` is NaN for a mode the choice did not need scored (slower than a mode that holds)."""

    bits: int
    level: int
    symmetric: bool
    metric: float
    latency_ms: float
    error: str = ""

    @property
    def mode(self) -> tuple[int, bool]:
        return self.level, self.symmetric

    def as_dict(self) -> dict:
        """Plain JSON: a figure not measured (not scored, or refused) is null."""
        return {"bits": self.bits, "level": self.level, "symmetric": self.symmetric, "metric": _or_null(self.metric),
                "latency_ms": _or_null(self.latency_ms), "error": self.error}


def _or_null(value: float) -> float | None:
    return None if math.isnan(value) else value


def with_level(built: onnx.ModelProto, level: int) -> bytes:
    """``built``'s bytes with every MatMulNBits node at accuracy ``level`` (0: the attribute left out)."""
    model = onnx.ModelProto()
    model.CopyFrom(built)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + ([helper.make_attribute("accuracy_level", level)] if level else []))
    return model.SerializeToString()


def _holds(candidate: float, exact: float, goal: str, tolerance: float) -> bool:
    allowed = tolerance * abs(exact)
    return candidate >= exact - allowed if goal == "max" else candidate <= exact + allowed


def choose_modes(figures: list[ModeFigures], goal: str, tolerance: float = MODE_TOLERANCE) -> KernelModes:
    """The fastest mode of each bit width whose metric stays within ``tolerance`` of the exact mode's
    (the exact mode holds by definition, scored or not)."""
    levels, symmetric = [], []
    for bits in sorted({f.bits for f in figures}):
        measured = sorted((f for f in figures if f.bits == bits and not f.error), key=lambda f: f.latency_ms)
        exact = next((f for f in measured if f.mode == CANDIDATES[0]), None)
        if exact is None:
            continue
        best = next(f for f in measured if f is exact or (not math.isnan(f.metric) and not math.isnan(exact.metric)
                                                           and _holds(f.metric, exact.metric, goal, tolerance)))
        if best.level:
            levels.append((bits, best.level))
        if best.symmetric:
            symmetric.append(bits)
    return KernelModes(levels=tuple(levels), symmetric=tuple(symmetric))


def measure_modes(model, task: PreparedTask, linears: tuple[str, ...], bit_widths: tuple[int, ...], block: int,
                  feeds: dict, latency: LatencyConfig, threads: int, work: Path, tolerance: float = MODE_TOLERANCE,
                  lock: NodeLock | None = None) -> list[ModeFigures]:
    """Every candidate mode of every blockwise bit width timed, and scored as far as the choice
    needs (module docstring); builds in ``work``. ``lock``: held shared while building and
    scoring, exclusively while timing."""
    sample = task.sample_rows(min(SAMPLE_TEXTS, len(task.input_ids)), seed=0)
    timing = LatencyConfig(**{**latency.model_dump(), "warmup_runs": 1, "timed_runs": max(3, latency.timed_runs // 2),
                              "median_precision": max(MODE_PRECISION, latency.median_precision or 0.0)})
    shared = lock.shared if lock is not None else nullcontext
    goal = METRIC_GOALS[task.metric]
    figures = []
    work.mkdir(parents=True, exist_ok=True)
    for bits in bit_widths:
        plan = CompressionPlan(quantize={name: QuantSpec(FORMAT_OF_BITS[bits], block) for name in linears})
        built, timed, refused = {}, [], []
        for symmetric in (False, True):
            path = build_artifact(model, plan, work / f"{bits}-{symmetric}.onnx", output=task.output, hold=shared,
                                  modes=KernelModes(symmetric=(bits,) if symmetric else ())).path
            with shared():  # reading and copying whole graphs is heavy work too: not while a trial times
                built[symmetric] = onnx.load(str(path))
            path.unlink()
        for level, symmetric in CANDIDATES:
            exact = next((f.latency_ms for f in timed if f.mode == CANDIDATES[0]), None)
            try:
                with shared():
                    graph = with_level(built[symmetric], level)
                # a mode no faster than the exact one is never chosen: its first runs say so
                ms = as_dict(measure_latency(graph, feeds, timing, lock, slower_than=exact))["latency_ms"]
                timed.append(ModeFigures(bits, level, symmetric, float("nan"), ms))
            except Exception as exc:  # noqa: BLE001 - a mode this runtime refuses is left out, with why
                refused.append(ModeFigures(bits, level, symmetric, float("nan"), float("nan"), first_line(exc)))
        scored = _scored_as_needed(timed, built, task, sample, threads, goal, tolerance, shared)
        figures += sorted(scored + refused, key=lambda f: CANDIDATES.index(f.mode))
    return figures


def _scored_as_needed(timed: list[ModeFigures], built: dict[bool, onnx.ModelProto], task: PreparedTask,
                      sample, threads: int, goal: str, tolerance: float, shared) -> list[ModeFigures]:
    """``timed`` (one bit width) with metrics: the exact mode's and the faster modes', fastest first,
    up to the first that holds; nothing when the exact mode is the fastest."""

    def score(f: ModeFigures) -> ModeFigures:
        with shared():
            graph = with_level(built[f.symmetric], f.level)
        try:
            metric = as_dict(StagedQuality(graph, task, threads, sample, hold=shared).first_stage())[task.metric]
        except Exception as exc:  # noqa: BLE001 - timed but refused on the texts: left out, with why
            return ModeFigures(f.bits, f.level, f.symmetric, float("nan"), float("nan"), first_line(exc))
        return ModeFigures(f.bits, f.level, f.symmetric, metric, f.latency_ms)

    exact = next((f for f in timed if f.mode == CANDIDATES[0]), None)
    if exact is None:
        return timed
    faster = sorted((f for f in timed if f.latency_ms < exact.latency_ms), key=lambda f: f.latency_ms)
    if not faster:
        return timed
    done = {exact.mode: score(exact)}
    reference = done[exact.mode]
    for f in faster:
        done[f.mode] = score(f)
        if reference.error or (not done[f.mode].error and _holds(done[f.mode].metric, reference.metric, goal, tolerance)):
            break
    return [done.get(f.mode, f) for f in timed]


def modes_key(hardware: HardwareTarget, inputs_fingerprint: str, bit_widths: tuple[int, ...], block: int,
              latency: LatencyConfig) -> str:
    """The cache key of a node's measured modes: the hardware target, the model and task
    (``inputs_fingerprint``), the formats and the latency settings. Not the build threads (front
    recovery builds with more): the modes are timed at the latency's threads."""
    return fingerprint(hardware.key, inputs_fingerprint, str(bit_widths), str(block), latency.model_dump_json())


def cached_modes(cache: Path, measure) -> tuple[KernelModes, list[dict]]:
    """(modes, figures) from ``cache`` when it exists, else from ``measure()`` -> (modes, figures),
    written atomically to ``cache``. One process measures at a time: the others wait and read its result."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_file(cache.with_name(cache.name + ".lock")):
        if cache.is_file():
            data = json.loads(cache.read_text())
            return KernelModes.loads(data["modes"]), data["figures"]
        modes, figures = measure()
        write_atomically(cache, json.dumps({"modes": modes.dumps(), "figures": figures}, indent=1))
    return modes, figures


def measured_modes(model, task: PreparedTask, linears: tuple[str, ...], bit_widths: tuple[int, ...], block: int,
                   feeds: dict, latency: LatencyConfig, threads: int, cache: Path,
                   tolerance: float = MODE_TOLERANCE, lock: NodeLock | None = None) -> tuple[KernelModes, list[dict]]:
    """The chosen modes and every mode's figures, from ``cache`` or measured (``measure_modes``,
    under ``lock`` as it says)."""
    if not bit_widths:
        return EXACT, []

    def measure():
        work = cache.with_name(cache.stem + ".work")
        try:
            figures = measure_modes(model, task, linears, bit_widths, block, feeds, latency, threads, work,
                                    tolerance, lock)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return choose_modes(figures, METRIC_GOALS[task.metric], tolerance), [f.as_dict() for f in figures]

    return cached_modes(cache, measure)
