"""MatMulNBits compute modes on the built-in model, timed side by side in one run.

Builds uniform-int4 MiniLM once, then rewrites the MatMulNBits ``accuracy_level`` attribute
(0: fp32 activations; 4: int8 activations) and times each variant against fp32 and uniform int8
with the same latency settings as a search. Prints median ms and the ratio to fp32.

    .venv/bin/python benchmarks/int4_kernels.py [--runs 30]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx

from slimtune.config import LatencyConfig, SpaceConfig
from slimtune.evaluators.latency import latency_inputs, time_runs_ms
from slimtune.export import build_artifact
from slimtune.layout import discover_layout
from slimtune.model import load_model
from slimtune.spaces import SearchSpace


def _with_accuracy_level(source: Path, level: int, target: Path) -> Path:
    model = onnx.load(str(source))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
    onnx.save_model(model, str(target))
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    loaded = load_model("builtin:all-MiniLM-L6-v2")
    space = SearchSpace(discover_layout(loaded.module), SpaceConfig(ffn_sparsities=(0.0,), rank_fractions=(1.0,)))
    cfg = LatencyConfig(timed_runs=args.runs, median_precision=None)  # every run: the kernels side by side
    texts = loaded.tokenizer(["slimtune measures what it ships. " * 40] * 8, padding="max_length", truncation=True,
                             max_length=128, return_tensors="np")
    feeds = latency_inputs(texts["input_ids"].astype(np.int64), texts["attention_mask"].astype(np.int64), cfg)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for label, bits in (("fp32", 32), ("int8 MatMulInteger", 8), ("int4", 4)):
            choices = {d: bits if d.endswith(".bits") else o[0] for d, o in space.dimensions().items()}
            choices["embeddings.bits"] = 32
            paths[label] = build_artifact(loaded.module, space.plan_from_choices(choices), Path(tmp) / f"{bits}.onnx").path
        int4 = paths.pop("int4")
        for level in (0, 4):
            paths[f"int4 MatMulNBits accuracy_level={level}"] = _with_accuracy_level(int4, level, Path(tmp) / f"l{level}.onnx")
        medians = {label: float(np.median(time_runs_ms(path, feeds, cfg))) for label, path in paths.items()}
    print(f"{'variant':40s} {'median ms':>10s} {'vs fp32':>8s}   ({cfg.batch_size}x{cfg.sequence_length} tokens, "
          f"{cfg.threads} threads, {cfg.timed_runs} runs)")
    for label, ms in medians.items():
        print(f"{label:40s} {ms:10.1f} {ms / medians['fp32']:8.2f}")


if __name__ == "__main__":
    main()
