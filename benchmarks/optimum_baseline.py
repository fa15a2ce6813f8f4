"""Hugging Face Optimum's one-command ONNX artifacts of a model folder, as a baseline for slimtune.

Optimum is run for real, from its own virtual environment: ``optimum-onnx`` 0.1.0 (the newest) pins
``transformers<4.58`` and ``optimum~=2.1.0``, which clash with slimtune's transformers 5.x, so it
must not go into slimtune's .venv. The venv gets ``torch==2.13.0`` first, explicitly, under
``-c constraints.txt`` (the local CPU wheel; pip never pulls CUDA torch), then
``optimum-onnx[onnxruntime]==0.1.0`` under the same constraints, which lets pip take
transformers 4.57.x as optimum-onnx asks (no clash with the torch pin).

The artifacts output ``last_hidden_state``; :func:`optimum_pooled` mean-pools it with the attention
mask so they are scored exactly like slimtune's artifacts (which output ``sentence_embedding``).

CLI: ``.venv/bin/python benchmarks/optimum_baseline.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
DEFAULT_VENV = ROOT / "results" / ".optimum-venv"
OPTIMUM_REQ = "optimum-onnx[onnxruntime]==0.1.0"
STAMP = ".slimtune-optimum-stamp"


def _run(cmd: list[str], what: str) -> None:
    """Run ``cmd``; on failure raise RuntimeError with the last lines of its stderr."""
    print(f"[optimum] {what}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def ensure_optimum_venv(path: Path = DEFAULT_VENV) -> Path:
    """Create (once) a venv at ``path`` holding optimum-onnx; return ``path``.

    Reused when its stamp file records the same requirement and ``optimum-cli`` is there; a fresh
    build takes ~1 minute with local wheels, minutes from PyPI (torch, transformers, onnxruntime).
    """
    path = Path(path)
    stamp, cli = path / STAMP, path / "bin" / "optimum-cli"
    if stamp.is_file() and stamp.read_text().strip() == OPTIMUM_REQ and cli.is_file():
        return path
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS)]
    _run([sys.executable, "-m", "venv", "--clear", str(path)], "create venv")
    _run(pip + ["torch==2.13.0"], "install torch (CPU, pinned)")
    _run(pip + [OPTIMUM_REQ], "install optimum-onnx")
    stamp.write_text(OPTIMUM_REQ + "\n")
    print(f"[optimum] venv ready: {path}", flush=True)
    return path


def optimum_artifacts(model_dir: Path, out_dir: Path, venv: Path = DEFAULT_VENV) -> dict[str, Path]:
    """Export ``model_dir`` to fp32 ONNX and dynamically quantize it to int8 with ``optimum-cli``.

    ``--library-name transformers`` keeps the plain encoder (output ``last_hidden_state``) even though
    the folder is a sentence-transformers one. int8 is Optimum's avx512_vnni per-channel preset.
    """
    cli, out_dir = str(Path(venv) / "bin" / "optimum-cli"), Path(out_dir)
    fp32, int8 = out_dir / "fp32", out_dir / "int8"
    export = [cli, "export", "onnx", "--model", str(model_dir), "--task", "feature-extraction"]
    _run([*export, "--library-name", "transformers", str(fp32)], "export fp32")
    quantize = [cli, "onnxruntime", "quantize", "--onnx_model", str(fp32), "--avx512_vnni", "--per_channel"]
    _run([*quantize, "-o", str(int8)], "quantize int8")
    return {"optimum fp32": fp32 / "model.onnx", "optimum int8": int8 / "model_quantized.onnx"}


def optimum_feeds(path, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Feed dict for an Optimum ONNX file (path or InferenceSession): int64 ids and mask, plus
    ``token_type_ids`` zeros when the graph declares that input."""
    ids, mask = np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in _input_names(path):
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    return feeds


def optimum_pooled(session, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Attention-masked mean of ``last_hidden_state``: (batch, hidden) float32, the same sentence
    embedding slimtune's artifacts output directly as ``sentence_embedding``."""
    hidden = session.run(["last_hidden_state"], optimum_feeds(session, input_ids, attention_mask))[0]
    mask = np.asarray(attention_mask, np.float32)[..., None]
    return ((hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)).astype(np.float32)


def _input_names(path_or_session) -> set[str]:
    """Graph input names of an InferenceSession, or of an .onnx file (parsed, no session built)."""
    if hasattr(path_or_session, "get_inputs"):
        return {i.name for i in path_or_session.get_inputs()}
    import onnx

    return {i.name for i in onnx.load(str(path_or_session), load_external_data=False).graph.input}


def main(argv: list[str] | None = None) -> None:
    from slimtune.config import BUILTIN_MODEL
    from slimtune.model import resolve_model_source

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "optimum", help="output folder")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="Optimum's own venv")
    args = parser.parse_args(argv)
    venv = ensure_optimum_venv(args.venv)
    for name, path in optimum_artifacts(Path(resolve_model_source(BUILTIN_MODEL)), args.out, venv).items():
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB, 1 MB = 1e6 bytes)")


if __name__ == "__main__":
    main()
