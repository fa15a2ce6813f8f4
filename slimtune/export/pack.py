"""Pack a fused decoder's query, key and value projections into one matrix multiply per block.

``GroupQueryAttention`` takes the three projections as one packed input (its key and value inputs
left empty). At batch 1 a decode step is a chain of small matrix-vector products, each paying a
fixed cost per kernel, so one product of width q + k + v instead of three saves two kernels per
block; ONNX Runtime GenAI's graphs are packed the same way. The pass runs on the finished graph,
after the quantization passes (which find each planned Linear by its own node) and their check:
three projections are packed only when their kernels agree (all fp32 MatMul, or all MatMulNBits
with the same bits, block size, accuracy level and kind of zero points), so the packed weights are
the three weights side by side, byte for byte; any other mix (int8, a factorised projection) is
left as it is. Biases (Qwen2) are packed the same way, into one Add.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_NBITS_INPUTS = 4  # A, B (codes), scales, zero points; graphs with g_idx or bias inputs are left alone


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _packable(projections: list[onnx.NodeProto], inits: dict[str, onnx.TensorProto]) -> bool:
    first = projections[0]
    if any(p.input[0] != first.input[0] or p.op_type != first.op_type for p in projections):
        return False
    if first.op_type == "MatMul":
        return all(p.input[1] in inits for p in projections)
    if first.op_type != "MatMulNBits" or any(len(p.input) > _NBITS_INPUTS for p in projections):
        return False
    shared = {k: v for k, v in _attrs(first).items() if k != "N"}
    return all({k: v for k, v in _attrs(p).items() if k != "N"} == shared and len(p.input) == len(first.input)
               and all(name in inits for name in p.input[1:]) for p in projections)


def _concat(inits: dict[str, onnx.TensorProto], names: list[str], axis: int, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.concatenate([numpy_helper.to_array(inits[n]) for n in names], axis=axis), name)


def _producer(graph: onnx.GraphProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in graph.node if tensor in n.output), None)


def pack_attention_projections(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each GroupQueryAttention's query, key and value products packed into one (module
    docstring); unchanged where they cannot be. Edits ``model`` in place and returns it."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    removed: set[str] = set()
    for attention in [n for n in graph.node if n.op_type == "GroupQueryAttention"]:
        if len(attention.input) < 3 or not attention.input[1] or not attention.input[2]:
            continue
        heads = [_producer(graph, t) for t in attention.input[:3]]
        biases: list[onnx.NodeProto] = []
        if all(h is not None and h.op_type == "Add" and h.input[1] in inits for h in heads):
            biases, heads = heads, [_producer(graph, h.input[0]) for h in heads]
        if any(h is None for h in heads) or not _packable(heads, inits):
            continue
        if any(consumers.get(h.output[0], 0) != 1 for h in heads + biases):
            continue
        base = heads[0].name.rsplit("/", 2)[0] + "/qkv_proj"  # /model/.../self_attn/qkv_proj
        out = f"{base}/output"
        if heads[0].op_type == "MatMul":
            weight = _concat(inits, [h.input[1] for h in heads], 1, f"{base}.weight")
            packed = helper.make_node("MatMul", [heads[0].input[0], weight.name], [out], name=f"{base}/MatMul")
            new_inits = [weight]
        else:
            attrs = _attrs(heads[0])
            attrs["N"] = sum(_attrs(h)["N"] for h in heads)
            new_inits = [_concat(inits, [h.input[k] for h in heads], 0, f"{base}.weight_{suffix}")
                         for k, suffix in zip(range(1, len(heads[0].input)), ("Q", "scales", "zero_points"),
                                              strict=False)]
            packed = helper.make_node("MatMulNBits", [heads[0].input[0], *(i.name for i in new_inits)], [out],
                                      name=f"{base}/MatMulNBits", domain="com.microsoft", **attrs)
        nodes = [packed]
        if biases:
            bias = _concat(inits, [b.input[1] for b in biases], 0, f"{base}.bias")
            new_inits.append(bias)
            nodes.append(helper.make_node("Add", [out, bias.name], [f"{out}_biased"], name=f"{base}/Add"))
            out = f"{out}_biased"
        position = list(graph.node).index(heads[0])
        for k, node in enumerate(nodes):
            graph.node.insert(position + k, node)
        attention.input[0], attention.input[1], attention.input[2] = out, "", ""
        for node in heads + biases:
            graph.node.remove(node)
            removed.update(node.input[1:])
        graph.initializer.extend(new_inits)
    used = {name for n in graph.node for name in n.input}
    for name in removed - used:
        if name in inits:
            graph.initializer.remove(inits[name])
    return model
