"""ONNX Runtime GenAI's one-command int4 (and fp32) export of a causal LM, as a baseline for slimtune.

The model builder (``python -m onnxruntime_genai.models.builder``) runs from its own venv,
``results/.genai-venv`` (python3.11; the main .venv has no onnxruntime-genai), made by
:func:`ensure_genai_venv` with, in order (~40 s with the local wheels)::

    python3.11 -m venv results/.genai-venv
    results/.genai-venv/bin/pip install torch==2.13.0                      # local CPU wheel, first
    results/.genai-venv/bin/pip install -c constraints.txt onnxruntime-genai==0.18.0 \\
        transformers==5.24.0 onnx==1.23.2 onnx_ir==1.1.0                    # pulls onnxruntime 1.32.0

Builder flags: ``-i HF_DIR -o OUT -p int4|fp32 -e cpu -c CACHE`` (``--help`` crashes in 0.18.0 on a
stray ``%`` in its help text; read ``get_args`` in builder.py instead). With no ``--extra_options``
int4 means: RTN, symmetric int4, block_size 32, accuracy_level 4 (activations quantized to int8 in
MatMulNBits), every MatMul quantized, lm_head included; and since the model ties its embeddings,
``shared_embeddings`` defaults to true (the help text says false): the embedding is a
GatherBlockQuantized over the *same* int4 lm_head weight. fp32 likewise keeps one [576, 49152]
matrix (Gather over its Transpose). SmolLM2-135M: int4 86.5 MB, fp32 540.3 MB (1 MB = 1e6 bytes).
Measured on the 2-core dev machine (P=128, T=64, 2 threads): int4 TTFT ~83 ms, decode ~3.3 ms/token;
fp32 TTFT ~88 ms, decode ~11.9 ms/token.

Graph signature (int4 and fp32 alike; opset 22 + com.microsoft: MatMulNBits, GroupQueryAttention
with fused rotary, SkipSimplifiedLayerNormalization, GatherBlockQuantized)::

    input_ids                     int64 [batch, seq]
    attention_mask                int64 [batch, past_len + seq]   (no position_ids input:
                                                                    GQA derives positions from it)
    past_key_values.{0..29}.key   float [batch, 3, past_len, 64]  (and .value; kv heads 3, head 64)
    logits                        float [batch, seq, 49152]
    present.{0..29}.key           float [batch, 3, past_len + seq, 64]  (and .value)

Plain onnxruntime 1.32 (main .venv) runs it with an empty past (past_len 0) and batch > 1: a
batch of 4 windows of 128 tokens gives exactly the logits of the 4 windows run one by one, and
fp32 matches transformers to 1e-4. See :func:`genai_feeds`. (int4's last-token logits differ by
~0.6 between a full-window run and a cached 1-token step, fp32's by 3e-5: likely MatMulNBits'
int8-activation kernels differing between M=1 and M>1.)

CLI (re-executes itself under the genai venv when onnxruntime_genai is missing)::

    python benchmarks/genai_baseline.py [--precision int4|fp32] [--prompt 128] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "results" / ".genai-venv"
OUT = ROOT / "results" / "genai"
PYTHON = sys.executable  # the venv is made by the interpreter running this (slimtune's: Python 3.11+)
REQS = ["onnxruntime-genai==0.18.0", "transformers==5.24.0", "onnx==1.23.2", "onnx_ir==1.1.0"]
STAMP = ".slimtune-genai-stamp"
PROMPT_TEXT = ("The history of computing is a story of abstraction. Early machines were programmed by "
               "rewiring panels; later, stored programs, compilers and operating systems let people "
               "describe what they wanted instead of how the hardware should do it. ")


def _run(cmd: list[str], what: str, log: Path | None = None) -> None:
    """Run ``cmd`` (output to ``log`` or discarded); raise RuntimeError with its tail on failure."""
    print(f"[genai] {what}: {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
    with open(log or os.devnull, "w") as fh:
        rc = subprocess.run(list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log else ""
        raise RuntimeError(f"{what} failed (exit {rc}){': see ' + str(log) if log else ''}\n{tail}")


def ensure_genai_venv(path: Path = VENV) -> Path:
    """Create (once; a stamp records the requirements) the builder's venv at ``path``."""
    path, want = Path(path), "\n".join(["torch==2.13.0", *REQS])
    if (path / STAMP).is_file() and (path / STAMP).read_text().strip() == want:
        return path
    pip = [path / "bin" / "python", "-m", "pip", "install", "--quiet"]
    _run([PYTHON, "-m", "venv", "--clear", path], "create venv")
    _run([*pip, "torch==2.13.0"], "install torch (CPU wheel)")
    _run([*pip, "-c", ROOT / "constraints.txt", *REQS], "install onnxruntime-genai + builder deps")
    (path / STAMP).write_text(want + "\n")
    return path


def builder_args(precision: str, hf_dir: Path | None, out: Path | None = None) -> list[str]:
    """The model builder's flags for ``precision`` (int4 | fp32) on CPU, default options (``hf_dir``
    None: an output built before)."""
    out = Path(out or OUT / precision)
    return ["-i", str(hf_dir or "<built before>"), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(OUT / ".cache")]


def build_genai(precision: str, hf_dir: Path, out: Path | None = None) -> Path:
    """Build ``out`` (default results/genai/<precision>) unless it has model.onnx and
    genai_config.json already; builds into ``<out>.partial`` and renames. Returns the folder."""
    out = Path(out or OUT / precision)
    if (out / "model.onnx").is_file() and (out / "genai_config.json").is_file():
        return out
    venv, tmp = ensure_genai_venv(), out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    builder = [venv / "bin" / "python", "-m", "onnxruntime_genai.models.builder"]
    log = out.with_name(f"{out.name}-build.log")
    _run([*builder, *builder_args(precision, hf_dir, tmp)], f"build {precision}", log=log)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def size_mb(model_dir: Path) -> float:
    """Size in MB (1e6 bytes) of the folder's ``*.onnx`` and ``*.onnx.data`` files."""
    files = [*Path(model_dir).glob("*.onnx"), *Path(model_dir).glob("*.onnx.data")]
    return sum(f.stat().st_size for f in files) / 1e6


def genai_feeds(session, input_ids, head_dim: int | None = None) -> dict:
    """Feeds for a full-window forward with an empty KV cache in plain onnxruntime.

    ``input_ids``: int [batch, seq] (batch > 1 works). Mask is all ones; every
    ``past_key_values.*`` input gets float32 zeros [batch, kv_heads, 0, head_dim]: kv_heads from
    the input's shape, head_dim (a symbolic dim in the graph) from ``head_dim``, else the
    genai_config.json beside the model file, else 64. Output ``logits``: float32 [batch, seq, vocab].
    """
    import numpy as np

    if head_dim is None:
        cfg = Path(getattr(session, "_model_path", None) or ".").parent / "genai_config.json"
        head_dim = json.loads(cfg.read_text())["model"]["decoder"]["head_size"] if cfg.is_file() else 64
    ids = np.asarray(input_ids, dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int64)}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((ids.shape[0], inp.shape[1], 0, head_dim), np.float32)
    return feeds


def measure(model_dir: Path, prompt_tokens: int = 128, gen_tokens: int = 64, repeats: int = 5,
            threads: int = 2) -> dict:
    """Greedy generation, batch 1, with onnxruntime-genai's own loop; medians over ``repeats``
    (after one warm-up run). ``ttft_ms``: append_tokens (prefill of ``prompt_tokens`` ids) plus the
    first generate_next_token, in ms (Generator creation not counted). ``decode_ms_per_token``: median
    of the remaining ``gen_tokens - 1`` generate_next_token calls, ms. min_length = max_length =
    prompt + gen, so exactly ``gen_tokens`` come out (asserted). ``threads`` goes to the decoder's
    session_options (intra_op_num_threads, overlaid on genai_config.json; the file is untouched)."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
    model = og.Model(config)
    ids = np.asarray(og.Tokenizer(model).encode(PROMPT_TEXT), np.int32)
    prompt = np.resize(ids, prompt_tokens)  # the text's ids, repeated and cut to exactly P
    total, ttfts, steps = prompt_tokens + gen_tokens, [], []
    for rep in range(repeats + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        gen.generate_next_token()
        ttft, times = (time.perf_counter() - t0) * 1e3, []
        while not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()
            times.append((time.perf_counter() - t) * 1e3)
        produced = len(gen.get_sequence(0)) - prompt_tokens
        assert produced == gen_tokens, f"generated {produced} tokens, wanted {gen_tokens}"
        if rep:  # rep 0 is the warm-up
            ttfts.append(ttft)
            steps.append(statistics.median(times) if times else float("nan"))
        del gen
    decode = statistics.median(steps)
    return {"ttft_ms": statistics.median(ttfts), "decode_ms_per_token": decode,
            "tokens_per_s": 1e3 / decode, "ttft_ms_runs": ttfts, "decode_ms_runs": steps}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", choices=["int4", "fp32"], default="int4")
    ap.add_argument("--model", type=Path, default=None,
                    help="Hugging Face model folder (default: slimtune's dequantized built-in SmolLM2-135M)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (results/genai/<precision>)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt length P, tokens")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens T")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads")
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args(argv)
    if args.model is None:
        out = Path(args.out or OUT / args.precision)
        if not (out / "model.onnx").is_file():
            from slimtune.config import BUILTIN_LLM
            from slimtune.model import resolve_model_source

            args.model = Path(resolve_model_source(BUILTIN_LLM))
    out = build_genai(args.precision, args.model, args.out)
    result = {"precision": args.precision, "model_dir": str(out), "size_mb": size_mb(out),
              "builder_args": builder_args(args.precision, args.model, out)}
    if not args.build_only:
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:  # main .venv: run again under the genai venv
            py = str(ensure_genai_venv() / "bin" / "python")
            os.execv(py, [py, __file__, *(argv if argv is not None else sys.argv[1:])])
        result.update(measure(out, args.prompt, args.tokens, args.repeats, args.threads),
                      prompt_tokens=args.prompt, gen_tokens=args.tokens, threads=args.threads)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
