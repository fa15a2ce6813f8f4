"""Verifying a rebuilt artifact against what the search measured: the same held-out quality, and
(on the same hardware target) a latency within the tolerance of the published one once corrected
for how fast the machine runs now, timed beside other front points' files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimtune.config import Config
from slimtune.evaluators.hardware import current_target
from slimtune.evaluators.latency import latency_inputs
from slimtune.evaluators.quality import measure_quality
from slimtune.release.rebuild import ReleaseError

LatencyTimer = Callable[[list[Path], dict[str, Any], Config], list[dict[str, float]]]
"""(files, latency feeds, the search's config) -> each file's latency figures, in order."""


def latencies_in_fresh_process(paths: list[Path], feeds, config: Config) -> list[dict[str, float]]:
    """Time the files one after another in a process of its own: the rebuild's torch thread pools
    (they spin for a while after work) must not share the cores with the timed runs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from slimtune.evaluators.node_lock import default_lock_path
    from slimtune.search.remeasure import isolated_latency

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [pool.submit(isolated_latency, str(p), feeds, config.latency, str(default_lock_path())).result()
                for p in paths]


def machine_drift(now_ms: list[float], then_ms: list[float]) -> float:
    """How much slower (> 1) or faster this machine runs now than during the search: the median
    ratio of other front points' latency timed now to their published figure. 1.0 without any."""
    import statistics

    ratios = [now / then for now, then in zip(now_ms, then_ms, strict=True) if then > 0]
    return statistics.median(ratios) if ratios else 1.0


def verify_rebuilt(path: Path, row: dict[str, str], task, config: Config, tolerance: float,
                   front: list[dict[str, str]], models: Path, timer: LatencyTimer) -> dict[str, dict[str, Any]]:
    """Re-measure the rebuilt file; quality must equal the logged figures, latency be within ``tolerance``
    of the search's, once corrected for how fast this machine runs now (timed on other front points'
    files, ``models``, side by side in the same process)."""
    figures: dict[str, dict[str, Any]] = {}
    for m in measure_quality(path, task, threads=max(1, int(config.search.cpus_per_trial))):
        figures[m.name] = {"value": m.value, "unit": m.unit}
        if row.get(m.name) and abs(m.value - float(row[m.name])) > 1e-6:
            raise ReleaseError(f"the rebuilt {row['trial']} scores {m.name} {m.value:.6f}, the search logged "
                               f"{float(row[m.name]):.6f}: it is not the model that was measured")
    feeds = latency_inputs(task.input_ids, task.attention_mask, config.latency)
    others = [r for r in front if r["trial"] != row["trial"] and (models / f"{r['trial']}.onnx").is_file()][:3]
    timed = timer([path] + [models / f"{r['trial']}.onnx" for r in others], feeds, config)
    for name, value in timed[0].items():
        figures[name] = {"value": value, "unit": "ms" if name.endswith("_ms") else "fraction"}
    figures["size_mb"] = {"value": path.stat().st_size / 1e6, "unit": "MB"}
    drift = machine_drift([t["latency_ms"] for t in timed[1:]], [float(r["latency_ms"]) for r in others])
    figures["machine_drift"] = {"value": drift, "unit": "ratio"}
    ratio = figures["latency_ms"]["value"] / float(row["latency_ms"]) / drift
    if row.get("hardware") == current_target().key and abs(ratio - 1) > tolerance:
        lost = timed[0].get("cpu_contention")
        cause = f"other programs took {lost:.0%} of its CPU time: " if lost is not None and timed[0].get(
            "machine_busy") else "is the machine busy? "
        raise ReleaseError(f"the rebuilt {row['trial']} runs in {figures['latency_ms']['value']:.1f} ms, x{ratio:.2f} "
                           f"of the search's {float(row['latency_ms']):.1f} ms on the same hardware (after this machine's "
                           f"drift of x{drift:.2f}, timed on {len(others)} other front points), beyond the tolerance of "
                           f"{tolerance:.0%}: {cause}retry on a quiet machine, or raise --latency-tolerance")
    return figures
