"""Measuring one compression plan: build its artifact, score it, time it, weigh it.

What it needs is a ``PlanInputs`` value (the uncompressed model, the prepared task, its
calibration statistics, the latency batch, the hardware target and the kernel modes), so a search
worker, the export's verification and the baselines measure the same way. Staged scoring stops a
candidate after a sample of the held-out texts when a measured point already dominates it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtune.config import METRIC_GOALS, LatencyConfig, SearchConfig
from slimtune.evaluators import as_dict
from slimtune.evaluators.hardware import HardwareTarget, current_target
from slimtune.evaluators.latency import measure_latency
from slimtune.evaluators.node_lock import NodeLock
from slimtune.evaluators.quality import StagedQuality
from slimtune.evaluators.size import measure_size
from slimtune.export import build_artifact
from slimtune.export.modes import EXACT, KernelModes
from slimtune.plan import CompressionPlan
from slimtune.tasks import PreparedTask
from slimtune.transforms import Calibration

SCREEN_MIN_TEXTS = 50  # staged scoring needs a sample that says something: smaller held-out sets are scored whole
UNCOMPRESSED_CHECK_TEXTS = 16
"""Sampled texts an export of the uncompressed model is scored on before its sample takes the
uncompressed model's outputs (``StagedQuality.first_stage``): four scoring runs of the default's
128-token texts. Its fp32 export's first stage took 1.2 s instead of 9.7 s in a 30-trial search on
a 2-core Intel Xeon (avx512_vnni amx_int8), where it runs beside the other worker and the
kernel-mode task; alone, 16 texts at the 30 ms a text measured on a 2-core AMD EPYC (avx512_vnni)
are 0.5 s against 3.4 s for 112. A CPU without AVX-512 scores every text slower: the saving grows
with it."""


class NonFiniteMetricError(FloatingPointError):
    """A measured objective is NaN or infinite; the trial is failed rather than reported."""


@dataclass(frozen=True)
class PlanInputs:
    """What measuring a plan needs. ``calibration``: the activation statistics (and, for recovery,
    the training texts) the plan's transforms read; ``feeds``: the latency batch
    (``latency_inputs``); ``modes``: how the blockwise kernels are built (``trial_modes``)."""

    model: torch.nn.Module
    task: PreparedTask
    calibration: Calibration
    feeds: dict[str, np.ndarray]
    hardware: HardwareTarget = field(default_factory=current_target)
    modes: KernelModes = EXACT


def _better_and_smaller(measured_dir: Path, goal: str, screen_score: float, texts: int, size_mb: float,
                        margin: float, hardware: str) -> Iterator[tuple[str, float]]:
    """(file stem, latency ms) of each measured result in ``measured_dir`` on the same hardware that
    is at most as large as a candidate and better on the same sampled texts by more than ``margin``
    (a fraction of its score): it dominates the candidate unless the candidate is faster."""
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
        if better and other["size_mb"] <= size_mb:
            yield path.stem, float(other["latency_ms"])


def dominating_point(measured_dir: Path, goal: str, screen_score: float, texts: int, latency_ms: float,
                     size_mb: float, margin: float, hardware: str) -> str | None:
    """The measured result (file stem) in ``measured_dir`` that dominates a candidate for sure, if any:
    on the same hardware, at most as slow and as large, and better on the same sampled texts by more
    than ``margin`` (a fraction of its score). None when no measured point does."""
    return next((stem for stem, theirs in _better_and_smaller(measured_dir, goal, screen_score, texts, size_mb,
                                                              margin, hardware) if theirs <= latency_ms), None)


def dominated_from_ms(measured_dir: Path, goal: str, screen_score: float, texts: int, size_mb: float,
                      margin: float, hardware: str) -> float | None:
    """The latency (ms) from which a candidate is dominated for sure (``dominating_point``): the
    fastest of the measured points that are better on the sample and at most as large; None when
    none is."""
    return min((theirs for _, theirs in _better_and_smaller(measured_dir, goal, screen_score, texts, size_mb,
                                                            margin, hardware)), default=None)


def measure_plan(inputs: PlanInputs, plan: CompressionPlan, path: Path, latency_cfg: LatencyConfig,
                 threads: int, lock: NodeLock, search: SearchConfig | None = None,
                 measured_dir: Path | None = None) -> dict[str, Any]:
    """Build the artifact for ``plan`` at ``path`` and measure it: metrics, timings (s), kernels.

    Staged scoring (``search.screen_fraction`` below 1 and a ``measured_dir`` of this search's
    results): the task's metric on a seeded sample of the held-out texts first (``screen_score``),
    then size and latency; the remaining texts are scored unless a measured point already
    dominates the candidate (``dominating_point``), in which case the sample's figures are its
    quality figures, ``quality_texts`` says how many texts, ``screened`` is 1 and ``screened_by``
    is that point's measurement key. Its timing ends early too when the first runs already say
    it is dominated (``dominated_from_ms`` as ``measure_latency``'s ``slower_than``): its latency
    is then of ``EARLY_RUNS`` runs (``latency_runs``), all at least that point's. A plan that
    leaves the model as it is (``is_identity``) is always timed in full, and when its artifact
    computes what the uncompressed model computed on the sample
    (``StagedQuality.uncompressed_figures``) it takes that model's figures on all held-out texts
    instead of scoring the rest (``quality_by_uncompressed`` 1); it scores ``UNCOMPRESSED_CHECK_TEXTS``
    of its sample first and, when they match, takes that model's outputs for the rest of the sample too.
    Building holds ``lock`` shared stage by stage, scoring (``threads`` ORT threads) batch by batch;
    latency holds it exclusively. Timings: ``compress_s``, ``export_s``, ``quantize_s``, ``recover_s`` (the
    artifact's build), ``quality_s`` (scoring), ``latency_s`` (timing), ``wait_s`` (waiting for the lock).
    """
    task = inputs.task
    total = len(task.input_ids)
    fraction = search.screen_fraction if search is not None and measured_dir is not None else 1.0
    first = task.sample_rows(max(SCREEN_MIN_TEXTS, math.ceil(fraction * total)), seed=0)
    timings = {"wait_s": 0.0, "quality_s": 0.0, "latency_s": 0.0}
    waited = time.perf_counter()
    artifact = build_artifact(inputs.model, plan, path, inputs.calibration, task.output, hold=lock.shared,
                              modes=inputs.modes)
    timings["wait_s"] += time.perf_counter() - waited - artifact.build_s  # stage by stage, under the lock
    started = time.perf_counter()
    staged = len(first) < total
    quality = StagedQuality(path, task, threads, first, hold=lock.shared)  # held batch by batch
    sampled = as_dict(quality.first_stage(UNCOMPRESSED_CHECK_TEXTS if plan.is_identity and staged else 0))
    timings["quality_s"] += time.perf_counter() - started

    @contextlib.contextmanager
    def timing() -> Iterator[None]:  # the node to itself (each attempt): the wait for it and the time holding it
        waited = time.perf_counter()
        with lock.exclusive():
            timings["wait_s"] += time.perf_counter() - waited
            started = time.perf_counter()
            yield
            timings["latency_s"] += time.perf_counter() - started

    size = as_dict(measure_size(path))
    screen = (METRIC_GOALS[task.metric], sampled[task.metric], len(first))
    slower_than = (dominated_from_ms(measured_dir, *screen, size["size_mb"], search.screen_margin, inputs.hardware.key)
                   if staged and not plan.is_identity else None)
    latency = as_dict(measure_latency(path, inputs.feeds, latency_cfg, hold=timing, slower_than=slower_than,
                                      opening=lock.shared))
    screened, by_uncompressed = None, None  # the measured points are read again: others may have ended meanwhile
    if plan.is_identity and staged:
        by_uncompressed = quality.uncompressed_figures()
    if by_uncompressed is None and staged:
        screened = dominating_point(measured_dir, *screen, latency["latency_ms"], size["size_mb"], search.screen_margin,
                                    inputs.hardware.key)
    if by_uncompressed is not None:
        scored = as_dict(by_uncompressed)
    elif screened is None:
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
        "quality_by_uncompressed": int(by_uncompressed is not None),
        "screened_by": screened or "",
        "kernels": json.dumps(artifact.matmul_kernels, sort_keys=True), "exporter": artifact.exporter,
        "kernel_modes": inputs.modes.dumps(),
        "artifact": str(path),
        "hardware": inputs.hardware.key, "node": inputs.hardware.node,
    }
