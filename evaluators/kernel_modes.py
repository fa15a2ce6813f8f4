"""Measure the kernel modes of the blockwise formats on this hardware target, for this model.

For each bit width the space offers (4, 2), the model with every Linear at that width (round to
nearest, the space's first block size) is built once with zero points and once symmetric, and
each file is run at accuracy level 0 and 4: quality on a fixed sample of the held-out texts by
the task's metric, latency as the search times it. ``EXACT`` (level 0, zero points) is the
reference; a mode holds quality when its metric is no worse than the reference's by more than
``tolerance`` (a fraction of the reference's value); the fastest mode that holds it is kept. A
mode ONNX Runtime refuses on this machine is left out. Units: ms (latency), the metric's own.

Measured once per search and node (cached in the search's work folder, keyed by the hardware
target, the model and task, the formats and the latency settings) under the node's exclusive
lock: a trial's latency never shares the cores with it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from slimtune.config import METRIC_GOALS, LatencyConfig
from slimtune.errors import first_line
from slimtune.evaluators import as_dict
from slimtune.evaluators.latency import measure_latency
from slimtune.evaluators.quality import StagedQuality
from slimtune.export import build_artifact
from slimtune.export.modes import EXACT, KernelModes
from slimtune.plan import CompressionPlan, QuantSpec
from slimtune.tasks import PreparedTask

MODE_TOLERANCE = 0.01  # a mode may cost at most 1% of the exact mode's metric (perplexity +1%, accuracy -1%)
SAMPLE_TEXTS = 32
CANDIDATES = ((0, False), (4, False), (0, True), (4, True))  # (accuracy level, symmetric); the first is exact
_FORMATS = {4: "int4", 2: "int2"}


@dataclass(frozen=True)
class ModeFigures:
    """One measured mode of one bit width: its metric on the sample and its latency (ms)."""

    bits: int
    level: int
    symmetric: bool
    metric: float
    latency_ms: float
    error: str = ""

    def as_dict(self) -> dict:
        return {"bits": self.bits, "level": self.level, "symmetric": self.symmetric, "metric": self.metric,
                "latency_ms": self.latency_ms, "error": self.error}


def _set_level(path: Path, out: Path, level: int) -> Path:
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + ([helper.make_attribute("accuracy_level", level)] if level else []))
    onnx.save_model(model, str(out))
    return out


def choose_modes(figures: list[ModeFigures], goal: str, tolerance: float = MODE_TOLERANCE) -> KernelModes:
    """The fastest mode of each bit width whose metric stays within ``tolerance`` of the exact mode's."""
    levels, symmetric = [], []
    for bits in sorted({f.bits for f in figures}):
        measured = [f for f in figures if f.bits == bits and not f.error]
        exact = next((f for f in measured if (f.level, f.symmetric) == CANDIDATES[0]), None)
        if exact is None:
            continue
        allowed = tolerance * abs(exact.metric)

        def holds(f: ModeFigures, exact: ModeFigures = exact, allowed: float = allowed) -> bool:
            return f.metric >= exact.metric - allowed if goal == "max" else f.metric <= exact.metric + allowed

        best = min((f for f in measured if holds(f)), key=lambda f: f.latency_ms)
        levels.append((bits, best.level))
        if best.symmetric:
            symmetric.append(bits)
    return KernelModes(levels=tuple(levels), symmetric=tuple(symmetric))


def measure_modes(model, task: PreparedTask, linears: tuple[str, ...], bit_widths: tuple[int, ...], block: int,
                  feeds: dict, latency: LatencyConfig, threads: int, work: Path) -> list[ModeFigures]:
    """Every candidate mode of every blockwise bit width (module docstring), measured in ``work``."""
    sample = task.sample_rows(min(SAMPLE_TEXTS, len(task.input_ids)), seed=0)
    timing = LatencyConfig(**{**latency.model_dump(), "warmup_runs": 1, "timed_runs": max(3, latency.timed_runs // 2)})
    figures = []
    work.mkdir(parents=True, exist_ok=True)
    for bits in bit_widths:
        plan = CompressionPlan(quantize={name: QuantSpec(_FORMATS[bits], block) for name in linears})
        for symmetric in (False, True):
            built = build_artifact(model, plan, work / f"{bits}-{symmetric}.onnx", output=task.output,
                                   modes=KernelModes(symmetric=(bits,) if symmetric else ())).path
            for level in (0, 4):
                try:
                    path = _set_level(built, work / f"{bits}-{symmetric}-{level}.onnx", level)
                    metric = as_dict(StagedQuality(path, task, threads, sample).first_stage())[task.metric]
                    ms = as_dict(measure_latency(path, feeds, timing))["latency_ms"]
                    figures.append(ModeFigures(bits, level, symmetric, metric, ms))
                except Exception as exc:  # noqa: BLE001 - a mode this runtime refuses is left out, with why
                    figures.append(ModeFigures(bits, level, symmetric, float("nan"), float("nan"),
                                               first_line(exc)))
        for leftover in work.glob(f"{bits}-*.onnx"):
            leftover.unlink()
    return figures


def cached_modes(cache: Path, measure) -> tuple[KernelModes, list[dict]]:
    """(modes, figures) from ``cache`` when it exists, else from ``measure()`` -> (modes, figures),
    written atomically to ``cache``."""
    if cache.is_file():
        data = json.loads(cache.read_text())
        return KernelModes.loads(data["modes"]), data["figures"]
    modes, figures = measure()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps({"modes": modes.dumps(), "figures": figures}, indent=1))
    tmp.replace(cache)
    return modes, figures


def measured_modes(model, task: PreparedTask, linears: tuple[str, ...], bit_widths: tuple[int, ...], block: int,
                   feeds: dict, latency: LatencyConfig, threads: int, cache: Path,
                   tolerance: float = MODE_TOLERANCE) -> tuple[KernelModes, list[dict]]:
    """The chosen modes and every mode's figures, from ``cache`` or measured (``measure_modes``)."""
    if not bit_widths:
        return EXACT, []

    def measure():
        work = cache.with_name(cache.stem + ".work")
        try:
            figures = measure_modes(model, task, linears, bit_widths, block, feeds, latency, threads, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return choose_modes(figures, METRIC_GOALS[task.metric], tolerance), [f.as_dict() for f in figures]

    return cached_modes(cache, measure)
