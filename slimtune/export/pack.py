"""Pack a fused decoder's query, key and value projections into one matrix multiply per block.

``GroupQueryAttention`` takes the three projections as one packed input (its key and value inputs
left empty). At batch 1 a decode step is a chain of small matrix-vector products, each paying a
fixed cost per kernel, so one product of width q + k + v instead of three saves two kernels per
block; ONNX Runtime GenAI's graphs are packed the same way. The pass runs on the finished graph,
after the quantization passes (which find each planned Linear by its own node) and their check:
three projections are packed only when their kernels agree (all fp32 MatMul, or all MatMulNBits
with the same bits, block size, accuracy level and kind of zero points), so the packed weights are
the three weights side by side, byte for byte; any other mix (int8, a factorised projection) is
left as it is. Biases (Qwen2) and grid remainders (``slimtune.export.grid``) are packed the same
way, into one Add and one remainder product.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class _Projection:
    """How one projection reaches the attention: its product ``core`` (MatMul or MatMulNBits), for a
    grid-encoded weight the remainder product ``rest`` and the ``join`` adding both, then ``bias``."""

    core: onnx.NodeProto
    rest: onnx.NodeProto | None = None
    join: onnx.NodeProto | None = None
    bias: onnx.NodeProto | None = None

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return [n for n in (self.core, self.rest, self.join, self.bias) if n is not None]


def _projection(graph: onnx.GraphProto, tensor: str, inits: dict) -> _Projection | None:
    node = _producer(graph, tensor)
    bias = None
    if node is not None and node.op_type == "Add" and node.input[1] in inits:
        bias, node = node, _producer(graph, node.input[0])
    if node is None:
        return None
    if node.op_type == "Add":  # a grid weight: MatMulNBits + remainder MatMul (slimtune.export.grid)
        parts = [_producer(graph, name) for name in node.input]
        if any(p is None for p in parts) or parts[1].op_type != "MatMul" or parts[1].input[1] not in inits:
            return None
        return _Projection(core=parts[0], rest=parts[1], join=node, bias=bias)
    return _Projection(core=node, bias=bias)


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
        found = [_projection(graph, t, inits) for t in attention.input[:3]]
        if any(f is None for f in found):
            continue
        heads = [f.core for f in found]
        shapes = {(f.rest is not None, f.bias is not None) for f in found}
        if len(shapes) != 1 or not _packable(heads, inits):
            continue
        with_rest, with_bias = shapes.pop()
        if with_rest and len({f.rest.input[0] for f in found}) != 1:
            continue
        if any(consumers.get(n.output[0], 0) != 1 for f in found for n in f.nodes):
            continue
        base = heads[0].name.rsplit("/", 2)[0] + "/qkv_proj"  # /model/.../self_attn/qkv_proj
        out = f"{base}/output"
        if heads[0].op_type == "MatMul":
            weight = _concat(inits, [h.input[1] for h in heads], 1, f"{base}.weight")
            nodes = [helper.make_node("MatMul", [heads[0].input[0], weight.name], [out], name=f"{base}/MatMul")]
            new_inits = [weight]
        else:
            attrs = _attrs(heads[0])
            attrs["N"] = sum(_attrs(h)["N"] for h in heads)
            new_inits = [_concat(inits, [h.input[k] for h in heads], 0, f"{base}.weight_{suffix}")
                         for k, suffix in zip(range(1, len(heads[0].input)), ("Q", "scales", "zero_points"),
                                              strict=False)]
            nodes = [helper.make_node("MatMulNBits", [heads[0].input[0], *(i.name for i in new_inits)], [out],
                                      name=f"{base}/MatMulNBits", domain="com.microsoft", **attrs)]
        if with_rest:
            remainders = _concat(inits, [f.rest.input[1] for f in found], 1, f"{base}.weight_remainders")
            new_inits.append(remainders)
            nodes += [helper.make_node("MatMul", [found[0].rest.input[0], remainders.name], [f"{out}_rest"],
                                       name=f"{base}/grid_remainder"),
                      helper.make_node("Add", [out, f"{out}_rest"], [f"{out}_grid"], name=f"{base}/grid_add")]
            out = f"{out}_grid"
        if with_bias:
            bias = _concat(inits, [f.bias.input[1] for f in found], 0, f"{base}.bias")
            new_inits.append(bias)
            nodes.append(helper.make_node("Add", [out, bias.name], [f"{out}_biased"], name=f"{base}/Add"))
            out = f"{out}_biased"
        position = max(list(graph.node).index(n) for f in found for n in f.nodes)
        for k, node in enumerate(nodes):
            graph.node.insert(position + 1 + k, node)
        attention.input[0], attention.input[1], attention.input[2] = out, "", ""
        for f in found:
            for node in f.nodes:
                graph.node.remove(node)
                removed.update(node.input[1:])
        graph.initializer.extend(new_inits)
    used = {name for n in graph.node for name in n.input}
    for name in removed - used:
        if name in inits:
            graph.initializer.remove(inits[name])
    return model
