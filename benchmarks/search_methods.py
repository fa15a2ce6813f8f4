"""Search methods side by side on the default model and task: one-click tools, greedy, random, slimtune's samplers.

Runs on this machine, in one go: the one-click baselines by the real tools (Optimum's int8 from
its own venv, ONNX Runtime's dynamic int8 per channel and its 4-bit MatMulNBits), the greedy
per-layer baseline (sensitivity path), then real slimtune searches (Ray, Optuna, MLflow) with
random sampling and each of slimtune's samplers at budgets N and 3N trials, each with several seeds.
Every search has the same enqueued reference points; front recovery is off for all. Random at N is
the first N trials of random at 3N (its proposals do not depend on the total). The default sampler
(NSGA-II with the sensitivity profile) is charged for the profile: its trial budget is N minus the
profile's time in trials.

Reported per method and budget: hypervolume in the same box relative to fp32 for all (quality
floor ``--floor`` of fp32's metric, fp32's latency and size; each search against the fp32 it
measured, as the host's speed drifts between searches), the lowest latency (x fp32) and smallest
size within 1 point of fp32, trials per hour, and where a trial's time goes. The best points within 1 point and the one-click baselines are then timed side by side
(interleaved) for the dominance check. Writes ``search-methods.md`` and ``search-methods.png``.

    .venv/bin/python benchmarks/search_methods.py --budget 10 --seeds 3

``--against REV`` also runs the default search at 3N trials with the earlier git revision REV and
with this code, ``--rounds`` times interleaved, for trials per hour and the time split before and
after (``revisions.py``); ``--only-against`` runs that comparison alone (``search-speed.md``).
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import onnxruntime as ort
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import greedy_run, one_click  # noqa: E402
from revisions import trials_per_hour_side_by_side  # noqa: E402
from search_runs import TIME_PARTS, Point, Reference, Run, run_search  # noqa: E402
from toolbox import _time_interleaved  # noqa: E402

from slimtune.config import load_config  # noqa: E402
from slimtune.evaluators.hardware import cpu_description  # noqa: E402
from slimtune.evaluators.quality import session  # noqa: E402
from slimtune.phases import phases_on  # noqa: E402
from slimtune.prepare import prepare  # noqa: E402
from slimtune.search.trial import make_space, task_calibration  # noqa: E402

SAMPLER_LABELS = {"nsga2": "slimtune nsga2 (default: sensitivity-seeded)", "tpe": "slimtune tpe",
                  "random": "random search"}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _model_file(run: Run, point: Point) -> Path | None:
    """The front model a search kept for ``point`` (results/<name>/models/<trial>.onnx), if any."""
    trial = point.label.split(" ")[0]
    path = Path(run.notes.get("folder", "")) / "models" / f"{trial}.onnx"
    return path if path.is_file() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=10, help="N: trials of the small budget (3N the large)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samplers", default="random,tpe,nsga2",
                        help="in run order: nsga2 is charged for the profile at the pace of the searches before it")
    parser.add_argument("--floor", type=float, default=0.9, help="hypervolume quality floor, fraction of fp32's metric")
    parser.add_argument("--no-optimum", action="store_true")
    parser.add_argument("--repeat", action="store_true", help="run the default sampler's seed 0 at 3N twice and "
                                                                "compare the plans it proposed")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per artifact in the side-by-side timing")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    parser.add_argument("--against", metavar="REV", help="also run the default search (3N trials) with the earlier "
                        "git revision REV and with this code, interleaved, for trials per hour before and after")
    parser.add_argument("--rounds", type=int, default=2, help="searches per revision with --against")
    parser.add_argument("--only-against", action="store_true", help="with --against: that comparison alone")
    args = parser.parse_args(argv)
    console = Console()
    began = time.perf_counter()
    speed = []
    if args.against:
        console.rule(f"the default search, {args.against} against this code, interleaved")
        speed = ["", f"Before and after: the default search by {args.against} and by this code, {3 * args.budget} "
                 f"trials each, fresh process and folder each, interleaved ({cpu_description()}):", "",
                 *trials_per_hour_side_by_side(args.against, 3 * args.budget, args.rounds,
                                               args.out / "search-speed")]
        if args.only_against:
            (args.out / "search-speed.md").write_text("\n".join(speed) + "\n")
            print("\n".join(speed))
            return
    work = args.out / "search-methods"
    shutil.rmtree(work, ignore_errors=True)
    (work / "runs").mkdir(parents=True)
    (work / "runs" / ".cache").symlink_to(Path("results/.cache").resolve())  # prepared task and profile: once
    config = load_config(None)
    prepared = prepare(config, Path("results"), phases_on(console))
    config, task = prepared.config, prepared.task
    threads = config.latency.threads
    n = args.budget

    console.rule("one-click baselines (real tools)")
    clicks = one_click(prepared, work / "one-click", threads, not args.no_optimum)
    for label, (point, _) in clicks.items():
        console.print(f"{label}: {task.metric} {point.quality:.4f}, {point.size_mb:.2f} MB")

    console.rule("greedy per-layer baseline")
    space = make_space(config, prepared.loaded.module, task_calibration(prepared.loaded.module, task))
    greedy = greedy_run(prepared, space, work / "greedy", n, 1.0, Path("results"))
    profile_s = greedy.notes["profile_s"]
    console.print(f"greedy: {len(greedy.points)} steps, sensitivity profile {profile_s:.0f} s")

    runs: list[Run] = []
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    for sampler in samplers:
        for seed in range(args.seeds):
            for budget in ((3 * n,) if sampler == "random" else (n, 3 * n)):
                trials = budget
                if sampler == "nsga2":  # charged for the profile, in trials of the last search's pace
                    pace = runs[-1].search_wall_s / max(1, len(runs[-1].points)) if runs else 4.0
                    trials = max(2, budget - math.ceil(profile_s / pace))
                console.rule(f"{SAMPLER_LABELS[sampler]}, seed {seed}, budget {budget} ({trials} trials)")
                run = run_search(SAMPLER_LABELS[sampler], sampler, seed, trials, work / "runs",
                                 {"search": {"sensitivity": sampler == "nsga2"}}, task.metric)
                run.budget = budget
                run.extra_cost_trials = budget - trials
                runs.append(run)
                if sampler == "random":
                    runs.append(run.prefix(n))
                console.print(f"{run.trials} trials ({run.trials - len(run.points)} screened) in {run.search_wall_s:.0f} s "
                              f"({run.trials_per_hour():.0f}/h)")

    repeat = None
    if args.repeat and "nsga2" in samplers:
        first = next(r for r in runs if r.method == SAMPLER_LABELS["nsga2"] and r.seed == 0 and r.budget == 3 * n)
        console.rule("the default sampler's seed 0 at 3N again: are the plans the same?")
        again = run_search(SAMPLER_LABELS["nsga2"] + " (repeat)", "nsga2", 0, len(first.notes["plans"]), work / "runs",
                           {}, task.metric)
        a, b = first.notes["plans"], again.notes["plans"]
        repeat = (sum(x == y for x, y in zip(a, b, strict=False)), max(len(a), len(b)),
                  next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None))

    fp32_points = [r.fp32 for r in runs]
    fp32 = Point(_median([p.quality for p in fp32_points]), _median([p.latency_ms for p in fp32_points]),
                 _median([p.size_mb for p in fp32_points]), "fp32")
    ref = Reference(fp32, args.floor)  # the side-by-side figures' fp32 (they are timed together)
    methods = [greedy, *runs]

    # Side by side: the one-click artifacts and each method's fastest and smallest point within 1 point.
    console.rule("timing side by side")
    contenders: dict[str, tuple] = {label: (session(Path(p.artifact), threads), feeds) for label, (p, feeds)
                                    in clicks.items()}
    points_of: dict[str, Point] = {label: p for label, (p, _) in clicks.items()}
    feeds = next(iter(clicks.values()))[1]
    for run in methods:
        if run.budget != 3 * n and run is not greedy:
            continue
        for kind, pick in (("fastest", lambda p: p.latency_ms), ("smallest", lambda p: p.size_mb)):
            near = run.reference(args.floor).within(run.points)
            if not near:
                continue
            # the best one whose model the search kept (its front, after re-timing)
            kept = [(p, Path(p.artifact) if run is greedy else _model_file(run, p)) for p in sorted(near, key=pick)]
            kept = [(p, path) for p, path in kept if path is not None and path.is_file()]
            if not kept:
                continue
            best, path = kept[0]
            label = f"{run.method} s{run.seed} {kind} ({best.label})"
            if label in contenders:
                continue
            contenders[label] = (session(path, threads), feeds)
            points_of[label] = best
    medians = _time_interleaved(contenders, args.runs)

    lines = ["# Search methods on the default model and task",
             "",
             f"`{' '.join(['.venv/bin/python', 'benchmarks/search_methods.py'] + (argv or sys.argv[1:]))}`; "
             f"{platform.processor() or platform.machine()}, {ort.get_device()} onnxruntime {ort.__version__}, "
             f"{time.strftime('%Y-%m-%d')}; N = {n}, {args.seeds} seeds; {config.latency.batch_size}x"
             f"{config.latency.sequence_length} tokens, {threads} threads; whole benchmark "
             f"{(time.perf_counter() - began) / 60:.0f} min",
             "",
             f"fp32: {task.metric} {fp32.quality:.4f}, {fp32.size_mb:.2f} MB, "
             f"{min(p.latency_ms for p in fp32_points):.1f} to {max(p.latency_ms for p in fp32_points):.1f} ms in the "
             f"searches (the host's speed drifts). Each search is read against its own fp32: hypervolume in the box "
             f"({args.floor:.0%} of fp32's {task.metric}, fp32's latency, fp32's size), divided by the box's quality "
             f"depth (1.0 would be a free model as good as fp32); latencies as published (front points re-timed in "
             f"isolation at the end of their search).",
             "",
             "| method | budget | trials run | hypervolume median [min, max] | lowest latency within 1 pt, x fp32 "
             "| smallest MB within 1 pt | trials/h |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, int], list[Run]] = {}
    for run in methods:
        groups.setdefault((run.method, run.budget), []).append(run)
    summary: dict[tuple[str, int], float] = {}
    for (method, budget), group in groups.items():
        boxes = [(r, r.reference(args.floor)) for r in group]
        hvs = [box.hypervolume(r.points) for r, box in boxes]
        summary[(method, budget)] = _median(hvs)
        fastest = [min(p.latency_ms for p in box.within(r.points)) / r.fp32.latency_ms for r, box in boxes
                   if box.within(r.points)]
        smallest = [min(p.size_mb for p in box.within(r.points)) for r, box in boxes if box.within(r.points)]
        charged = f" (+{group[0].extra_cost_trials:.0f} profile)" if group[0].extra_cost_trials else ""
        lines.append(f"| {method} | {budget} | {_median([r.trials for r in group]):.0f}{charged} | "
                     f"{_median(hvs):.4f} [{min(hvs):.4f}, {max(hvs):.4f}] | {_fmt(_median(fastest), 3)} | "
                     f"{_fmt(_median(smallest), 2)} | {_median([r.trials_per_hour() for r in group]):.0f} |")
    lines += ["", "Where a trial's time goes (mean s per trial, searches at 3N; overhead = worker wall time not "
              "spent in the parts: Ray, loading, idle slots):", "",
              "| method | " + " | ".join(p.removesuffix("_s") for p in TIME_PARTS) + " | overhead | wall per trial "
              "(x workers) | overhead + wait share |", "|---|" + "---|" * (len(TIME_PARTS) + 3)]
    for (method, budget), group in groups.items():
        if budget != 3 * n and method != greedy.method:
            continue
        splits = [r.time_split() for r in group]
        mean = {k: statistics.fmean(s[k] for s in splits) for k in splits[0]}
        share = (mean["overhead_s"] + mean["wait_s"]) / mean["wall_per_trial_s"]
        lines.append(f"| {method} | " + " | ".join(f"{mean[p]:.2f}" for p in TIME_PARTS) +
                     f" | {mean['overhead_s']:.2f} | {mean['wall_per_trial_s']:.2f} | {share:.0%} |")
    lines += speed
    lines += ["", f"Side by side (interleaved, medians of {args.runs} runs): the one-click baselines and each "
              f"method's fastest and smallest point within 1 point of fp32 (3N searches, by seed).", "",
              f"| artifact | {task.metric} | ms | MB |", "|---|---|---|---|"]
    for label, point in points_of.items():
        lines.append(f"| {label} | {point.quality:.4f} | {medians[label]:.1f} | {point.size_mb:.2f} |")
    default, rand = SAMPLER_LABELS["nsga2"], SAMPLER_LABELS["random"]
    if (default, n) in summary and (rand, 3 * n) in summary:
        lines += ["", f"Target: default at N vs random at 3N: {summary[(default, n)]:.4f} vs "
                      f"{summary[(rand, 3 * n)]:.4f} ({'met' if summary[(default, n)] >= summary[(rand, 3 * n)] else 'not met'})."]
    optimum = points_of.get("optimum int8")
    if optimum is not None:
        beat = [label for label, p in points_of.items() if label.startswith(default) and
                p.quality >= fp32.quality - 0.01 and medians[label] < medians["optimum int8"] and p.size_mb < optimum.size_mb]
        lines.append(f"Target: a default-sampler point within 1 point, faster and smaller than Optimum int8 "
                     f"({medians['optimum int8']:.1f} ms, {optimum.size_mb:.2f} MB): "
                     f"{', '.join(beat) if beat else 'none'}.")
    if repeat is not None:
        same, total, first_diff = repeat
        lines.append(f"Repeated search (default sampler, seed 0, 3N): {same} of {total} proposed plans the same"
                     + (f", first difference at trial {first_diff}." if first_diff is not None else "."))
    table = "\n".join(lines)
    (args.out / "search-methods.md").write_text(table + "\n")
    _plot(groups, ref, args.out / "search-methods.png", n, points_of, medians, task.metric, clicks)
    print(table)
    print(f"\nwritten to {args.out / 'search-methods.md'} and search-methods.png")


def _plot(groups, ref: Reference, path: Path, n: int, points_of, medians, metric: str, clicks) -> None:
    """Left: hypervolume per seed and budget. Right: the side-by-side points, latency against size,
    one colour per method, the one-click baselines in black and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    methods = sorted({m for m, _ in groups})
    for index, method in enumerate(methods):
        for budget, marker in ((n, "o"), (3 * n, "s")):
            hvs = [r.reference(ref.quality_floor).hypervolume(r.points) for r in groups.get((method, budget), [])]
            left.scatter([index + (0.15 if budget == 3 * n else -0.15)] * len(hvs), hvs, marker=marker,
                         color=f"C{index}")
    left.set_xticks(range(len(methods)), [m.replace(" (", "\n(") for m in methods], fontsize=7)
    left.set_ylabel("hypervolume (box relative to each search's own fp32)")
    left.set_title(f"hypervolume per seed: circles N={n}, squares 3N={3 * n}")
    for label, point in points_of.items():
        if label in clicks:
            right.scatter(medians[label], point.size_mb, color="black", marker="x")
            right.annotate(f"{label} ({point.quality:.4f})", (medians[label], point.size_mb), fontsize=7,
                           xytext=(4, 4), textcoords="offset points")
            continue
        index = next(i for i, m in enumerate(methods) if label.startswith(m))
        right.scatter(medians[label], point.size_mb, color=f"C{index}", alpha=0.7,
                      label=methods[index] if not any(methods[index] == h for h in right.get_legend_handles_labels()[1])
                      else None)
    right.set_xlabel("latency ms (timed side by side)")
    right.set_ylabel("size MB")
    right.set_title(f"fastest and smallest points within 1 point of fp32's {metric}")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
