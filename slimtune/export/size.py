"""Size of an artifact on disk, and the size a plan predicts for it, in bytes.

The prediction counts the stored weights of the transformed model in the formats the plan asks
for, as ONNX Runtime's kernels store them:

* fp32: 4 bytes per value.
* int8 Linear (MatMulInteger): 1 byte per value + an fp32 scale and an int8 zero point per output channel.
* int4 / int2 Linear (MatMulNBits): per output channel, the input dimension is cut into
  ceil(n_in / block) blocks, each stored whole (the last one padded) at 4 or 2 bits per value,
  + an fp32 scale per block + a zero point per block: packed at 4 / 2 bits, byte-aligned per
  channel (``rtn``, ``gptq``), or an fp32 value (``hqq``, whose zero points are not integers).
* int8 embedding: 1 byte per value + an fp32 scale per row.
* int4 embedding (GatherBlockQuantized): uint4 values (the whole table packed, half a byte each)
  + per row and block of the hidden size an fp32 scale and a uint4 zero point (packed over the
  whole scale grid).

The graph structure itself adds a small, model-dependent overhead on top.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import onnx
from torch import nn

from slimtune.plan import CompressionPlan

BITS = {"int4": 4, "int2": 2}  # bits per stored value of the blockwise formats


def artifact_bytes(path: Path) -> int:
    """Bytes on disk of an ONNX file plus every external-data file it references."""
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data if entry.key == "location"
    }
    return total + sum((path.parent / loc).stat().st_size for loc in locations)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex): what proves a rebuilt artifact is the one that was measured."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def linear_bytes(n_in: int, n_out: int, weight_format: str, block_size: int = 32, method: str = "rtn") -> int:
    """Stored bytes of an (n_in -> n_out) Linear's weight in ``weight_format`` (bias not included)."""
    if weight_format == "int8":
        return n_in * n_out + n_out * (4 + 1)
    if weight_format in BITS:
        bits, blocks = BITS[weight_format], math.ceil(n_in / block_size)
        zero_points = n_out * blocks * 4 if method == "hqq" else n_out * math.ceil(blocks * bits / 8)
        remainders = n_out * blocks * 4 if method == "grid" else 0  # fp32, one per block (slimtune.export.grid)
        return n_out * blocks * block_size * bits // 8 + n_out * blocks * 4 + zero_points + remainders
    return n_in * n_out * 4


def embedding_bytes(rows: int, dim: int, weight_format: str, block_size: int = 32) -> int:
    """Stored bytes of a (rows x dim) lookup table in ``weight_format``."""
    if weight_format == "int8":
        return rows * dim + rows * 4
    if weight_format == "int4":
        blocks = math.ceil(dim / block_size)
        return math.ceil(rows * dim / 2) + rows * blocks * 4 + math.ceil(rows * blocks / 2)
    return rows * dim * 4


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
            total += embedding_bytes(module.num_embeddings, module.embedding_dim, spec.format, spec.block_size)
        else:
            total += linear_bytes(module.in_features, module.out_features, spec.format, spec.block_size,
                                  spec.method)
            if module.bias is not None:
                total += module.bias.numel() * 4
                counted.add(id(module.bias))
        counted.add(id(module.weight))
    for tensor in list(transformed.parameters()) + list(transformed.buffers()):
        if id(tensor) not in counted:
            total += tensor.numel() * tensor.element_size()
    return total
