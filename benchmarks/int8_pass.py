"""The int8 pass on the built-in model, through ONNX Runtime's file path and in memory, side by side.

Uniform per-channel int8 on every Linear of all-MiniLM-L6-v2, built ``--rounds`` times each,
interleaved, in one process: the graph pass's seconds (``quantize_s``) and whether the two files
are the same bytes.

    .venv/bin/python benchmarks/int8_pass.py --rounds 5
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
from pathlib import Path

import slimtune.export.int8 as quantize
from slimtune.config import BUILTIN_MODEL
from slimtune.evaluators.hardware import cpu_description
from slimtune.export import build_artifact
from slimtune.layout import discover_layout
from slimtune.model import load_model
from slimtune.plan import CompressionPlan, QuantSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = load_model(BUILTIN_MODEL).module
    plan = CompressionPlan(quantize={name: QuantSpec("int8") for name in discover_layout(model).linears})
    limit = quantize.IN_MEMORY_LIMIT_BYTES
    seconds: dict[str, list[float]] = {"through files": [], "in memory": []}
    digests: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for way in seconds:
                quantize.IN_MEMORY_LIMIT_BYTES = 0 if way == "through files" else limit
                artifact = build_artifact(model, plan, Path(folder) / "int8.onnx")
                seconds[way].append(artifact.quantize_s)
                digests[way] = hashlib.sha256(artifact.path.read_bytes()).hexdigest()
    quantize.IN_MEMORY_LIMIT_BYTES = limit
    print(cpu_description())
    for way, values in seconds.items():
        print(f"{way}: quantize_s median {statistics.median(values):.3f} ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"ratio files / memory: {statistics.median(seconds['through files']) / statistics.median(seconds['in memory']):.2f}; "
          f"identical bytes: {len(set(digests.values())) == 1}")


if __name__ == "__main__":
    main()
