"""Check, after the quantization passes, that the graph holds exactly the compression the plan asked for.

A quantizer that skips a node (unsupported shape, a name it did not match, an option it ignores)
leaves an fp32 MatMul behind without an error; one that ignores its exclude list changes layers the
plan left alone. Either way the measured artifact would not be the planned one, so both are errors.

Nodes are found by name. The passes derive each new node's name from the node it replaces:

* int8 Linear: ``<matmul>_quant`` (MatMulInteger, int8 weight), from ONNX Runtime's dynamic quantizer;
* int4 / int2 Linear: ``<matmul>_Q4`` / ``<matmul>_Q2`` (MatMulNBits with matching ``bits`` and
  ``block_size``), from its weight-only quantizer and from the GPTQ pass;
* int8 table: ``<gather>_int8_gather`` (Gather of an int8 table);
* int4 table: ``<gather>_Q4`` (GatherBlockQuantized of a 4-bit table with matching ``block_size``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from slimtune.export.onnx_export import ExportError
from slimtune.plan import QuantSpec

_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_NBITS = {"int4": 4, "int2": 2}


@dataclass(frozen=True)
class WeightNodes:
    """The nodes of the fp32 graph that read a weight, by name: everything a pass may change.

    ``matmuls``: MatMul node -> its constant weight; ``gathers``: Gather node -> the table it reads.
    """

    matmuls: Mapping[str, str]
    gathers: Mapping[str, str]


def weight_nodes(model: onnx.ModelProto) -> WeightNodes:
    """Snapshot of the weight-reading nodes, taken before the passes (they edit the graph in place)."""
    floats = {i.name for i in model.graph.initializer if i.data_type in _FLOATS}
    matmuls = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in floats}
    gathers = {n.name: n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in floats}
    return WeightNodes(matmuls=matmuls, gathers=gathers)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _expected_linear(node_name: str, spec: QuantSpec) -> tuple[str, str, dict, tuple[int, ...]]:
    """(node name, op type, attributes, weight element types) a planned Linear's MatMul must become."""
    if spec.format == "int8":
        return f"{node_name}_quant", "MatMulInteger", {}, (TensorProto.INT8, TensorProto.UINT8)
    bits = _NBITS[spec.format]
    return f"{node_name}_Q{bits}", "MatMulNBits", {"bits": bits, "block_size": spec.block_size}, (TensorProto.UINT8,)


def _expected_table(gather_name: str, spec: QuantSpec) -> tuple[str, str, dict, tuple[int, ...]]:
    if spec.format == "int8":
        return f"{gather_name}_int8_gather", "Gather", {}, (TensorProto.INT8,)
    return (f"{gather_name}_Q4", "GatherBlockQuantized", {"block_size": spec.block_size},
            (TensorProto.UINT4, TensorProto.INT4, TensorProto.UINT8))


def _describe(spec: QuantSpec) -> str:
    return spec.format if not spec.is_blockwise else f"{spec.format} block {spec.block_size} ({spec.method})"


def verify_quantized(model: onnx.ModelProto, before: WeightNodes, linears: Mapping[str, tuple[str, QuantSpec]],
                     tables: Mapping[str, tuple[str, QuantSpec]]) -> None:
    """Raise ExportError unless every planned layer uses its intended kernel and no other layer changed.

    ``linears``: MatMul node name (in ``before``) -> (plan layer name, spec); ``tables``: embedding
    table initializer name -> (plan layer name, spec).
    """
    nodes = {n.name: n for n in model.graph.node}
    dtypes = {i.name: i.data_type for i in model.graph.initializer}
    problems: list[str] = []

    def check(layer: str, spec: QuantSpec, expected: tuple[str, str, dict, tuple[int, ...]], weight_input: int,
              original: str) -> None:
        name, op_type, attrs, weight_types = expected
        node = nodes.get(name)
        if node is None:
            left = nodes.get(original)
            state = f"still {left.op_type} {original!r}" if left is not None else f"no node {name!r}"
            problems.append(f"{layer}: planned {_describe(spec)} but the graph has {state} (left uncompressed)")
            return
        found = _attrs(node)
        wrong = {k: found.get(k) for k, v in attrs.items() if found.get(k) != v}
        weight = node.input[weight_input] if len(node.input) > weight_input else ""
        if node.op_type != op_type or wrong or dtypes.get(weight) not in weight_types:
            problems.append(f"{layer}: planned {_describe(spec)} ({op_type} {attrs}) but {name!r} is {node.op_type} "
                            f"with {wrong or 'matching attributes'} reading {weight!r}")
        if original in nodes:
            problems.append(f"{layer}: the fp32 node {original!r} is still in the graph")

    for matmul, (layer, spec) in sorted(linears.items()):
        if matmul not in before.matmuls:
            problems.append(f"{layer}: MatMul {matmul!r} is not a weight MatMul of the fp32 graph")
            continue
        check(layer, spec, _expected_linear(matmul, spec), 1, matmul)
    for table, (layer, spec) in sorted(tables.items()):
        lookups = [g for g, t in before.gathers.items() if t == table]
        if not lookups:
            problems.append(f"{layer}: no Gather of table {table!r} in the fp32 graph")
        for gather in sorted(lookups):
            check(layer, spec, _expected_table(gather, spec), 0, gather)
        if table in dtypes:
            problems.append(f"{layer}: the fp32 table {table!r} is still stored")

    def untouched(name: str, op_type: str, slot: int, tensor: str, what: str) -> None:
        node = nodes.get(name)
        if node is None or node.op_type != op_type or node.input[slot] != tensor or dtypes.get(tensor) not in _FLOATS:
            problems.append(f"{what} is not planned but changed ({'gone' if node is None else node.op_type}); "
                            "a pass touched the wrong node")

    for matmul, weight in sorted(before.matmuls.items()):
        if matmul not in linears:
            untouched(matmul, "MatMul", 1, weight, f"MatMul {matmul!r}")
    for gather, table in sorted(before.gathers.items()):
        if table not in tables:
            untouched(gather, "Gather", 0, table, f"table {table!r} (lookup {gather!r})")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ExportError("the quantized graph is not the planned one: " + "; ".join(problems[:5]) + more)
