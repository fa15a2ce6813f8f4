"""Quantization passes on the exported ONNX graph, where the bytes and kernels are real.

* int8 Linear: ONNX Runtime dynamic quantization with per-channel weight scales; MatMul becomes
  DynamicQuantizeLinear + MatMulInteger (the fast integer path on CPU).
* int4 Linear: blockwise 4-bit weights with a zero point per block; MatMul becomes MatMulNBits.
* int8 embedding: the token table is stored as int8 with one fp32 scale per row; the lookup
  becomes Gather(int8) -> Cast -> Mul(Gather(scale)).

Each pass touches exactly the nodes the plan names, by listing every other node as excluded
(the 4-bit quantizer's include list does not restrict anything).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimtune.export.onnx_export import ExportError

# MatMulNBits with fp32 activations. Measured on MiniLM, 8x128 tokens, 2 threads
# (benchmarks/int4_kernels.py): level 0 ran at 1.12x fp32 time, level 4 (int8 activations) at 1.34x.
INT4_ACCURACY_LEVEL = 0


def _matmulnbits_quantizer():
    # Importing the quantizer raises the root logger to INFO; put it back.
    root = logging.getLogger()
    level = root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.setLevel(level)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def _matmul_names(model: onnx.ModelProto) -> set[str]:
    return {n.name for n in model.graph.node if n.op_type == "MatMul"}


def quantize_int8_matmuls(model: onnx.ModelProto, nodes: set[str]) -> onnx.ModelProto:
    """Per-channel int8 weights for the named MatMul nodes (MatMulInteger kernels)."""
    if not nodes:
        return model
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # quiet its advice to pre-process the model
    with tempfile.TemporaryDirectory(prefix="slimtune-q8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        try:
            quantize_dynamic(
                model, out, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                nodes_to_quantize=sorted(nodes), nodes_to_exclude=sorted(_matmul_names(model) - nodes),
            )
        finally:
            root.setLevel(level)
        return onnx.load(str(out))


def quantize_int4_matmuls(model: onnx.ModelProto, nodes: set[str], block_size: int,
                          accuracy_level: int = INT4_ACCURACY_LEVEL) -> onnx.ModelProto:
    """Blockwise asymmetric 4-bit weights for the named MatMul nodes (MatMulNBits kernels)."""
    if not nodes:
        return model
    quantizer = _matmulnbits_quantizer()(
        model, bits=4, block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level,
        nodes_to_exclude=sorted(_matmul_names(model) - nodes), op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    return quantizer.model.model


def quantize_int8_embedding(model: onnx.ModelProto, weight_name: str) -> onnx.ModelProto:
    """Store the embedding table ``weight_name`` as int8 rows with one fp32 scale per row."""
    inits = {init.name: init for init in model.graph.initializer}
    if weight_name not in inits:
        raise ExportError(f"embedding weight {weight_name!r} is not an initializer of the exported graph")
    nodes = list(model.graph.node)
    consumers = {i for i, n in enumerate(nodes) if weight_name in n.input}  # positions: protobuf wrappers are not stable
    if any(nodes[i].op_type != "Gather" or nodes[i].input[0] != weight_name for i in consumers):
        raise ExportError(f"embedding weight {weight_name!r} is used by more than lookups (tied weights?); "
                          "plan it as fp32")
    table = numpy_helper.to_array(inits[weight_name]).astype(np.float32)
    scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    quantized = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
    q_name, s_name = f"{weight_name}_int8", f"{weight_name}_row_scale"
    model.graph.initializer.remove(inits[weight_name])
    model.graph.initializer.extend([
        numpy_helper.from_array(quantized, q_name), numpy_helper.from_array(scale.astype(np.float32), s_name),
    ])
    new_nodes = []
    for i, node in enumerate(nodes):
        if i not in consumers:
            new_nodes.append(node)
            continue
        ids, out = node.input[1], node.output[0]
        base = node.name or out
        new_nodes += [
            helper.make_node("Gather", [q_name, ids], [f"{base}_q"], name=f"{base}_int8_gather", axis=0),
            helper.make_node("Cast", [f"{base}_q"], [f"{base}_f"], name=f"{base}_int8_cast", to=TensorProto.FLOAT),
            helper.make_node("Gather", [s_name, ids], [f"{base}_s"], name=f"{base}_scale_gather", axis=0),
            helper.make_node("Mul", [f"{base}_f", f"{base}_s"], [out], name=f"{base}_dequant"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return model
