"""One-click baselines built by the real tools, and the greedy per-layer baseline, for the search-methods benchmark.

One-click: Optimum's ONNX export and its int8 (``optimum-cli``, from its own venv, see
``optimum_baseline.py``); ONNX Runtime's ``quantize_dynamic`` int8 with per-channel weights and
its ``MatMulNBitsQuantizer`` 4-bit (block 32, round-to-nearest), both applied to slimtune's fp32
export of the same model. Greedy: the sensitivity profile's path (``slimtune.search.sensitivity``),
measured step by step as trials are, until a step falls more than the tolerance below fp32.
"""

from __future__ import annotations

import time
from pathlib import Path

from optimum_baseline import ensure_optimum_venv, optimum_artifacts, optimum_pooled
from search_runs import Point, Run

from slimtune.evaluators.latency import latency_inputs
from slimtune.evaluators.node_lock import NodeLock
from slimtune.evaluators.quality import measure_quality, session
from slimtune.export import build_artifact
from slimtune.model import OutputSpec
from slimtune.plan import CompressionPlan
from slimtune.search.measure import PlanInputs, measure_plan
from slimtune.search.sensitivity import cached_profile, greedy_path, measure_profile, profile_key
from slimtune.search.trial import task_calibration
from slimtune.tasks import KINDS


def _score(path: Path, task, threads: int) -> float:
    return {m.name: m.value for m in measure_quality(path, task, threads)}[task.metric]


def ort_artifacts(prepared, folder: Path) -> dict[str, Path]:
    """ONNX Runtime's own quantizers run on slimtune's fp32 export: dynamic int8 per channel, 4-bit blocks."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from slimtune.export.quantize import _nbits_module  # imported without its root-logger side effect

    MatMulNBitsQuantizer = _nbits_module().MatMulNBitsQuantizer  # noqa: N806

    fp32 = build_artifact(prepared.loaded.module, CompressionPlan(), folder / "fp32.onnx", None,
                          prepared.task.output).path
    int8 = folder / "ort-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8)
    int4 = folder / "ort-int4.onnx"
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(int4), False)
    return {"slimtune fp32 export": fp32, "ORT dynamic int8 per-channel": int8, "ORT MatMulNBits int4 b32": int4}


def one_click(prepared, folder: Path, threads: int, with_optimum: bool = True) -> dict[str, tuple[Point, dict]]:
    """Each baseline's point (latency filled in later, timed side by side) and its ONNX Runtime feeds."""
    task = prepared.task
    feeds = latency_inputs(task.input_ids, task.attention_mask, prepared.config.latency)
    out: dict[str, tuple[Point, dict]] = {}
    for label, path in ort_artifacts(prepared, folder).items():
        out[label] = (Point(_score(path, task, threads), 0.0, path.stat().st_size / 1e6, label, str(path)), feeds)
    if with_optimum and task.output == OutputSpec("embedding", "mean"):
        from optimum_baseline import optimum_feeds

        venv = ensure_optimum_venv()
        for label, path in optimum_artifacts(Path(prepared.loaded.source), folder / "optimum", venv).items():
            sess = session(path, threads)
            embeddings = optimum_pooled(sess, task.input_ids, task.attention_mask)
            score = {m.name: m.value for m in KINDS[task.kind].score(task, embeddings)}[task.metric]
            out[label] = (Point(score, 0.0, path.stat().st_size / 1e6, label, str(path)),
                          optimum_feeds(sess, feeds["input_ids"], feeds["attention_mask"]))
    elif with_optimum:
        print(f"Optimum left out: its baseline scores mean-pooled embeddings, this task's artifacts output {task.output}")
    return out


def greedy_run(prepared, space, folder: Path, budget: int, tolerance_points: float, results: Path) -> Run:
    """The greedy per-layer baseline: sensitivity measured once (its time is part of the run), then the
    path's plans measured in order until one falls more than ``tolerance_points`` below fp32 or the
    budget is spent. Trials run one at a time with every core (no second worker to wait for)."""
    from slimtune.search.sensitivity import PROFILE_TEXTS

    config, task = prepared.config, prepared.task
    started = time.perf_counter()
    calibration = task_calibration(prepared.loaded.module, task)
    key = profile_key(prepared.loaded.source, prepared.task_path, space, PROFILE_TEXTS, config.task.seed)
    profile, _ = cached_profile(results / ".cache", key, lambda: measure_profile(
        prepared.loaded.module, space, task, calibration, PROFILE_TEXTS, config.task.seed))
    path = greedy_path(profile, space)
    inputs = PlanInputs(model=prepared.loaded.module, task=task, calibration=calibration,
                        feeds=latency_inputs(task.input_ids, task.attention_mask, config.latency))
    folder.mkdir(parents=True, exist_ok=True)
    lock = NodeLock(folder / "greedy.lock")
    points, times = [], []
    fp32 = None
    for index, (choices, _) in enumerate([(dict(), 0.0), *path][:budget]):
        began = time.time()
        plan = space.plan_from_choices(choices)
        result = measure_plan(inputs, plan, folder / f"greedy-{index}.onnx", config.latency, config.latency.threads, lock)
        point = Point(float(result[task.metric]), float(result["latency_ms"]), float(result["size_mb"]),
                      f"greedy step {index}", str(folder / f"greedy-{index}.onnx"))
        fp32 = fp32 or point
        points.append(point)
        times.append({**{k: float(result.get(k, 0.0)) for k in result if k.endswith("_s")},
                      "started_at": began, "finished_at": time.time(), "cached": False})
        if point.quality < fp32.quality - tolerance_points / 100:
            break
    wall = time.perf_counter() - started
    profile_trials = profile.seconds / max(1e-9, (wall - profile.seconds) / max(1, len(points)))
    return Run("greedy (sensitivity path)", 0, len(points), points, times, wall, wall, 1, len(points),
               extra_cost_trials=profile_trials, notes={"profile_s": profile.seconds})
