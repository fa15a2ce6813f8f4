"""What building a trial's artifact costs, this code against an earlier revision, on the same plans.

The default model and space; the reference plans and ``--plans`` plans sampled at random (seeded),
each built by both revisions in turn, each in a fresh process (``--rounds`` times, interleaved):
seconds per plan for the structural transforms, the fp32 export and the quantization passes, and
whether both wrote the same bytes for every plan. The earlier revision is checked out in a temporary
folder and run by an interpreter that imports it (``revisions.py``).

    .venv/bin/python benchmarks/build_cost.py --against da28010 --plans 8 --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from revisions import earlier_revision, imported_from  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("compress", "export", "quantize", "all")


def build_all(plans: int, out: Path) -> None:
    """In this process: build every plan with the slimtune this interpreter imports, write figures
    and digests to ``out``."""
    import optuna
    import torch

    from slimtune.config import load_config
    from slimtune.export import build_artifact
    from slimtune.prepare import prepare
    from slimtune.search.trial import make_space, task_calibration

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    prepared = prepare(load_config(None), ROOT / "results")
    model = prepared.loaded.module
    calibration = task_calibration(model, prepared.task)
    space = make_space(prepared.config, model, calibration)
    choices = list(space.reference_points().items())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(plans):
        trial = study.ask()
        space.suggest(trial)
        choices.append((f"random-{i}", dict(trial.params)))
    figures = {}
    for name, params in choices:
        path = out.parent / "artifacts" / f"{name}.onnx"
        started = time.perf_counter()
        artifact = build_artifact(model, space.plan_from_choices(params), path, calibration, prepared.task.output)
        figures[name] = {"all": time.perf_counter() - started, "compress": artifact.compress_s,
                         "export": artifact.export_s, "quantize": artifact.quantize_s,
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        path.unlink()
    out.write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the earlier git revision")
    parser.add_argument("--plans", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--build", nargs=2, metavar=("PLANS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build_all(int(args.build[0]), Path(args.build[1]))
        return
    from slimtune.evaluators.hardware import cpu_description

    work = ROOT / "results" / "benchmarks" / "build-cost"
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {f"{args.against} (earlier)": [], "this checkout": []}
    with earlier_revision(args.against) as earlier:
        pythons = dict(zip(runs, (earlier.python, Path(sys.executable)), strict=True))
        for label, python in pythons.items():
            print(f"{label}: slimtune from {imported_from(python)['slimtune']}", flush=True)
        for round_ in range(args.rounds):
            for label, python in pythons.items():
                out = work / f"round{round_}-{'this' if label == 'this checkout' else 'earlier'}.json"
                subprocess.run([str(python), __file__, "--against", args.against, "--build", str(args.plans), str(out)],
                               check=True, cwd=work)
                runs[label].append(json.loads(out.read_text()))
    print(f"{cpu_description()}; {args.plans} random plans + the references, {args.rounds} rounds, interleaved")
    print("| code | " + " | ".join(f"{p} s per plan" for p in PARTS) + " |")
    print("|---|" + "---|" * len(PARTS))
    means = {}
    for label, rounds in runs.items():
        means[label] = {p: statistics.fmean(f[p] for r in rounds for f in r.values()) for p in PARTS}
        print(f"| {label} | " + " | ".join(f"{means[label][p]:.3f}" for p in PARTS) + " |")
    first, last = (group[-1] for group in runs.values())
    same = sum(first[name]["sha256"] == last[name]["sha256"] for name in first)
    ratio = means[next(iter(runs))]["all"] / means["this checkout"]["all"]
    print(f"build {ratio:.2f}x faster; the same bytes for {same} of {len(first)} plans")


if __name__ == "__main__":
    main()
