"""Every compression method alone, against fp32 and Optimum's one-command tool, side by side in one run.

On the built-in model and task (or ``--config``, any task kind), builds each artifact once, scores
it in ONNX Runtime with the task's metric (accuracy of the frozen head on the default), then times
all of them side by side (rotating blocks of runs, ``--runs`` per artifact, the same feeds and
thread count) so that drift on the machine hits every variant alike. Prints one Markdown table:
the metric, size and median latency, each also as a ratio
to slimtune's fp32, and what each method costs to build (recovery, export, quantization, s).
Optimum's artifacts come from the real ``optimum-cli`` in its own virtual environment
(``benchmarks/optimum_baseline.py``; created on first use, minutes).

    .venv/bin/python benchmarks/toolbox.py [--runs 30] [--steps 120] [--no-optimum] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimum_baseline import optimum_artifacts, optimum_feeds, optimum_pooled  # noqa: E402

from slimtune.config import load_config  # noqa: E402
from slimtune.evaluators.latency import latency_inputs  # noqa: E402
from slimtune.evaluators.quality import measure_quality, session  # noqa: E402
from slimtune.export import build_artifact  # noqa: E402
from slimtune.model import OutputSpec  # noqa: E402
from slimtune.phases import phases_on  # noqa: E402
from slimtune.plan import CompressionPlan, QuantSpec  # noqa: E402
from slimtune.prepare import prepare  # noqa: E402
from slimtune.search.trial import recovery_spec, task_calibration  # noqa: E402
from slimtune.tasks import KINDS  # noqa: E402
from slimtune.transforms.heads import head_groups  # noqa: E402


def _plans(prepared, calibration, steps: int, recovery) -> dict[str, CompressionPlan]:
    layout = prepared.layout
    linears = layout.linears
    emb = layout.embedding

    def q(fmt: str, block: int = 32, method: str = "rtn", emb_spec: QuantSpec | None = None) -> dict:
        table = {emb: emb_spec or QuantSpec("int8")} if emb else {}
        return {**table, **{n: QuantSpec(fmt, block, method) for n in linears}}

    int8 = q("int8")
    blocks = [b.name for b in layout.blocks]
    plans = {
        "slimtune fp32": CompressionPlan(),
        "slimtune uniform int8": CompressionPlan(quantize=int8),
        "int8 + embedding int4 b32": CompressionPlan(quantize=q("int8", emb_spec=QuantSpec("int4", 32))),
        "int8 + embedding int4 b128": CompressionPlan(quantize=q("int8", emb_spec=QuantSpec("int4", 128))),
    }
    for method in ("rtn", "hqq", "gptq"):
        for block in (32, 128):
            plans[f"int4 {method} b{block} + embedding int4"] = CompressionPlan(
                quantize=q("int4", block, method, QuantSpec("int4", 128)))
    structural = {}
    n = len(blocks)
    for count in sorted({round(0.25 * n), round(0.5 * n)} - {0}):
        structural[f"int8 + depth -{count} blocks"] = {"depth_prune": calibration.least_important_blocks(count)}
    if head_groups(prepared.loaded.module):
        for fraction in (0.25, 0.5):
            structural[f"int8 + heads -{fraction:.0%}"] = {"head_prune": dict.fromkeys(blocks, fraction)}
    for fraction in (0.25, 0.5):
        structural[f"int8 + ffn -{fraction:.0%}"] = {"ffn_prune": dict.fromkeys(blocks, fraction)}
    ffn = [name for b in layout.blocks for name in b.ffn]
    for method in ("svd", "asvd"):
        structural[f"int8 + ffn rank 0.5 {method}"] = {"low_rank": dict.fromkeys(ffn, 0.5), "low_rank_method": method}
    for label, fields in structural.items():
        plans[label] = CompressionPlan(quantize=int8, **fields)
        plans[f"{label} + recovery"] = CompressionPlan(quantize=int8, recovery=recovery, **fields)
    return plans


def _time_interleaved(sessions: dict[str, tuple], runs: int, passes: int = 3) -> dict[str, float]:
    """Median ms per artifact, timed in ``passes`` rotations of short blocks (warm-up, then runs/passes).

    Blocks, not single runs, alternate: every ONNX Runtime session keeps a thread pool that spins
    for a while after its run, and with many sessions alive a round robin of single runs measures
    those spinning pools as much as the artifact (same-shape artifacts differed by 40% that way).
    Rotating blocks still spreads the machine's drift over every artifact alike.
    """
    times = {label: [] for label in sessions}
    per_block = max(1, runs // passes)
    for index in range(passes):
        labels = list(sessions)
        labels = labels[index % len(labels):] + labels[: index % len(labels)]
        for label in labels:
            sess, feeds = sessions[label]
            for _ in range(2):
                sess.run(None, feeds)
            for _ in range(per_block):
                start = time.perf_counter()
                sess.run(None, feeds)
                times[label].append((time.perf_counter() - start) * 1e3)
    return {label: float(np.median(t)) for label, t in times.items()}


def _seconds(row: dict, key: str, digits: int) -> str:
    """A build time in s, or '-' for artifacts another tool built (their times are not slimtune's)."""
    return f"{row[key]:.{digits}f}" if key in row else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=None, help="recovery steps (default: the config's)")
    parser.add_argument("--no-optimum", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated substrings: build only matching variants")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/toolbox.md"))
    args = parser.parse_args(argv)
    console = Console()
    config = load_config(args.config)
    if args.steps:
        config = config.model_copy(update={"recovery": config.recovery.model_copy(update={"steps": args.steps})})
    threads = config.latency.threads
    prepared = prepare(config, Path("results"), phases_on(console))
    config = prepared.config
    calibration = task_calibration(prepared.loaded.module, prepared.task)
    recovery = recovery_spec(config)
    plans = _plans(prepared, calibration, recovery.steps, recovery)
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        plans = {k: v for k, v in plans.items() if k == "slimtune fp32" or any(s in k for s in keep)}
    task = prepared.task
    metric = task.metric
    feeds = latency_inputs(task.input_ids, task.attention_mask, config.latency)
    rows: dict[str, dict] = {}
    sessions: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory(prefix="slimtune-bench-") as tmp:
        for index, (label, plan) in enumerate(plans.items()):
            with console.status(f"[{index + 1}/{len(plans)}] building and scoring {label}"):
                art = build_artifact(prepared.loaded.module, plan, Path(tmp) / f"{index}.onnx", calibration,
                                     task.output)
                score = {m.name: m.value for m in measure_quality(art.path, task, threads)}[metric]
            rows[label] = {"score": score, "size_mb": art.size_bytes / 1e6, "recover_s": art.recover_s,
                           "export_s": art.export_s, "quantize_s": art.quantize_s}
            sessions[label] = (session(art.path, threads), feeds)
            console.print(f"{label}: {metric} {score:.4f}, {rows[label]['size_mb']:.2f} MB, built in "
                          f"{art.recover_s + art.export_s + art.quantize_s:.1f} s")
        if task.output != OutputSpec("embedding", "mean"):
            console.print(f"Optimum left out: its baseline here scores mean-pooled embeddings, this task's "
                          f"artifacts output {task.output}")
        elif not args.no_optimum:
            model_dir = Path(prepared.loaded.source)
            for label, path in optimum_artifacts(model_dir, Path(tmp) / "optimum").items():
                sess = session(path, threads)
                embeddings = optimum_pooled(sess, task.input_ids, task.attention_mask)
                score = {m.name: m.value for m in KINDS[task.kind].score(task, embeddings)}[metric]
                rows[label] = {"score": score, "size_mb": path.stat().st_size / 1e6}
                sessions[label] = (sess, optimum_feeds(sess, feeds["input_ids"], feeds["attention_mask"]))
        with console.status(f"timing {len(sessions)} artifacts interleaved, {args.runs} rounds"):
            medians = _time_interleaved(sessions, args.runs)
    base = rows["slimtune fp32"]
    base_ms = medians["slimtune fp32"]
    lines = [f"{config.latency.batch_size}x{config.latency.sequence_length} tokens, {threads} ONNX Runtime threads, "
             f"medians of {args.runs} runs in 3 rotating blocks; {platform.processor() or platform.machine()}, "
             f"onnxruntime {ort.__version__}, {time.strftime('%Y-%m-%d')}; recovery {recovery.steps} steps x "
             f"{recovery.batch_size} texts", "",
             f"| variant | {metric} | Δ points | ms | × fp32 | MB | × fp32 | recovery s | export s | quantize s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        lines.append(
            f"| {label} | {row['score']:.4f} | {100 * (row['score'] - base['score']):+.2f} | "
            f"{medians[label]:.1f} | {medians[label] / base_ms:.2f} | {row['size_mb']:.2f} | "
            f"{row['size_mb'] / base['size_mb']:.3f} | {_seconds(row, 'recover_s', 0)} | "
            f"{_seconds(row, 'export_s', 1)} | {_seconds(row, 'quantize_s', 1)} |")
    table = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(table)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
