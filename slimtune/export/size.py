"""Size of an artifact on disk, and the size a plan predicts for it, in bytes.

The prediction counts the stored weights of the transformed model in the formats the plan asks
for (fp32: 4 bytes per value; int8 Linear: 1 byte per value + an fp32 scale and an int8 zero point
per output channel; int4 Linear: half a byte per value + per block an fp32 scale and a 4-bit zero
point; int8 embedding: 1 byte per value + an fp32 scale per row). The graph structure itself adds
a small, model-dependent overhead on top.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from torch import nn

from slimtune.plan import CompressionPlan


def artifact_bytes(path: Path) -> int:
    """Bytes on disk of an ONNX file plus every external-data file it references."""
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data if entry.key == "location"
    }
    return total + sum((path.parent / loc).stat().st_size for loc in locations)


def linear_bytes(n_in: int, n_out: int, weight_format: str, block_size: int = 32) -> int:
    if weight_format == "int8":
        return n_in * n_out + n_out * (4 + 1)
    if weight_format == "int4":
        blocks = math.ceil(n_in / block_size)
        return n_out * blocks * block_size // 2 + n_out * blocks * 4 + n_out * math.ceil(blocks / 2)
    return n_in * n_out * 4


def embedding_bytes(rows: int, dim: int, weight_format: str) -> int:
    return rows * dim + rows * 4 if weight_format == "int8" else rows * dim * 4


def _planned_name(module_name: str, plan: CompressionPlan) -> str | None:
    """The plan key a (possibly factorised) module belongs to."""
    if module_name in plan.quantize:
        return module_name
    parent, _, leaf = module_name.rpartition(".")
    return parent if leaf in ("first", "second") and parent in plan.quantize else None


def predict_size_bytes(transformed: nn.Module, plan: CompressionPlan) -> int:
    """Weight bytes of ``transformed`` (already pruned/factorised by ``plan``) once quantized."""
    total, counted = 0, set()
    for name, module in transformed.named_modules():
        key = _planned_name(name, plan)
        if key is None or not isinstance(module, nn.Linear | nn.Embedding):
            continue
        spec = plan.quantize[key]
        if isinstance(module, nn.Embedding):
            total += embedding_bytes(module.num_embeddings, module.embedding_dim, spec.format)
        else:
            total += linear_bytes(module.in_features, module.out_features, spec.format, spec.block_size)
            if module.bias is not None:
                total += module.bias.numel() * 4
                counted.add(id(module.bias))
        counted.add(id(module.weight))
    for tensor in list(transformed.parameters()) + list(transformed.buffers()):
        if id(tensor) not in counted:
            total += tensor.numel() * tensor.element_size()
    return total
