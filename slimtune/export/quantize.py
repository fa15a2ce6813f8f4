"""Quantization passes on the exported ONNX graph, where the bytes and kernels are real.

* int8 Linear: ONNX Runtime dynamic quantization with per-channel weight scales; MatMul becomes
  DynamicQuantizeLinear + MatMulInteger (the fast integer path on CPU).
* int4 / int2 Linear: blockwise weights with one fp32 scale and one zero point per block of
  ``block_size`` input elements; MatMul becomes MatMulNBits. How the low-bit values are chosen:
  ``rtn`` ONNX Runtime's round-to-nearest quantizer; ``hqq`` its half-quadratic quantizer (fp32
  zero points); ``gptq`` GPTQ with Hessians from calibration texts (implemented here, see
  ``_gptq``: the GPTQ of ONNX Runtime 1.32's weight-only quantizer propagates no error, so it
  returns round-to-nearest weights, and it crashes when a row holds an odd number of blocks).
  ONNX Runtime 1.32's CPU kernel runs 2-bit weights (checked against a numpy dequantization).
* int8 embedding: the token table is stored as int8 with one fp32 scale per row; the lookup
  becomes Gather(int8) -> Cast -> Mul(Gather(scale)).
* int4 embedding: ONNX Runtime's weight-only quantizer makes the table blockwise 4-bit along the
  hidden dimension (uint4 values, fp32 scales, uint4 zero points) read by GatherBlockQuantized.
  uint4 tensors need opset 21: the graph is converted first (the quantizer would only relabel
  it, which breaks nodes whose signature changed after opset 17, e.g. ReduceMean).

Each pass touches exactly the nodes the plan names, by listing every other node as excluded
(the quantizer's include list does not restrict anything); ``verify.py`` checks the result.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from slimtune.config import BLOCKWISE_FORMATS, WEIGHT_FORMAT_BITS
from slimtune.export.decoder import with_empty_past
from slimtune.export.grid import grid_matmuls, pack_bits
from slimtune.export.onnx_export import ExportError
from slimtune.export.weightless import without_weights

# MatMulNBits' accuracy level when none is given: 0, fp32 activations (exact). Searches measure the
# modes per hardware target instead (slimtune.export.modes).
INT4_ACCURACY_LEVEL = 0
BLOCKWISE_BITS = {name: WEIGHT_FORMAT_BITS[name] for name in BLOCKWISE_FORMATS}  # the formats MatMulNBits runs
GPTQ_DAMPING = 0.01  # fraction of the mean Hessian diagonal added to it (the GPTQ paper's default)
INT4_TABLE_OPSET = 21

Feeds = Sequence[Mapping[str, np.ndarray]]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the quantizers' INFO logs, numpy division warnings and torch's non-writable-array warning."""
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch (HQQ) and numpy's BLAS (GPTQ) on one thread while a pass runs.

    Their thread pools spin when the cores are shared (parallel trials, other processes): under
    a load of 4 on this 2-core machine, HQQ on MiniLM took 80-100 s with 2 threads and 0.6-1.4 s
    with one, GPTQ 27 s against 5 s. Alone on the machine one thread costs little (HQQ 0.6 s either way).
    """
    import torch
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


def _nbits_module():
    # Importing the quantizer module raises the root logger to INFO; put it back.
    root = logging.getLogger()
    level = root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.setLevel(level)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def _matmulnbits_quantizer():
    return _nbits_module().MatMulNBitsQuantizer


def _names(model: onnx.ModelProto, op_type: str) -> set[str]:
    return {n.name for n in model.graph.node if n.op_type == op_type}


def quantize_blockwise_matmuls(model: onnx.ModelProto, nodes: set[str], bits: int, block_size: int,
                               method: str = "rtn", feeds: Feeds | None = None,
                               accuracy_level: int = INT4_ACCURACY_LEVEL, symmetric: bool = False,
                               hold: Callable[[], AbstractContextManager] = nullcontext) -> onnx.ModelProto:
    """``bits``-bit weights in blocks of ``block_size`` for the named MatMul nodes (MatMulNBits kernels).

    ``feeds`` (graph input dicts of calibration texts) are what GPTQ measures its Hessians on;
    ``accuracy_level`` is the kernel's mode; ``symmetric`` stores round-to-nearest codes without
    zero points (GPTQ and HQQ always keep theirs). ``hold`` is entered around the pass, or around
    each of GPTQ's steps (a calibration batch, a Hessian's factor, a Linear's weights): seconds each.
    """
    if not nodes:
        return model
    if bits not in BLOCKWISE_BITS.values():
        raise ExportError(f"MatMulNBits runs {sorted(BLOCKWISE_BITS.values())}-bit weights here, not {bits}-bit")
    if method == "gptq":
        if not feeds:
            raise ExportError("GPTQ needs calibration texts: pass calibration=collect_calibration(model, ids, mask) "
                              "to build_artifact, or plan method 'rtn' / 'hqq'")
        with _single_threaded():
            return _gptq_matmuls(model, nodes, bits, block_size, feeds, accuracy_level, hold)
    if method == "grid":
        if bits != 4:
            raise ExportError(f"the grid method keeps a 4-bit source grid; it cannot store {bits}-bit weights")
        with hold():
            left = grid_matmuls(model, nodes, block_size, accuracy_level)  # off-grid weights: round to nearest
        return quantize_blockwise_matmuls(model, left, bits, block_size, "rtn", None, accuracy_level, symmetric, hold)
    if method not in ("rtn", "hqq"):
        raise ExportError(f"unknown blockwise quantization method {method!r}")
    config = _nbits_module().HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits) if method == "hqq" else None
    quantizer = _matmulnbits_quantizer()(
        model, bits=bits, block_size=block_size, is_symmetric=symmetric and method == "rtn",
        accuracy_level=accuracy_level, nodes_to_exclude=sorted(_names(model, "MatMul") - nodes),
        op_types_to_quantize=("MatMul",),
        algo_config=config,
    )
    with hold(), _quiet(), _single_threaded():
        quantizer.process()
    return quantizer.model.model


def calibration_feeds(input_ids: np.ndarray, attention_mask: np.ndarray, batch_size: int = 8) -> list[dict]:
    """Graph inputs for the calibration texts, ``batch_size`` texts per run."""
    return [{"input_ids": input_ids[i:i + batch_size].astype(np.int64),
             "attention_mask": attention_mask[i:i + batch_size].astype(np.int64)}
            for i in range(0, len(input_ids), batch_size)]


def _names_read(node: onnx.NodeProto) -> set[str]:
    """The values ``node`` reads: its inputs and, for a node with subgraphs (If, Loop, Scan), every
    name its subgraphs' nodes read (outer-scope values among them)."""
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        for graph in [attribute.g, *attribute.graphs] if attribute.type in (onnx.AttributeProto.GRAPH,
                                                                            onnx.AttributeProto.GRAPHS) else []:
            for inner in graph.node:
                names |= _names_read(inner)
    return names


def hessian_probe(model: onnx.ModelProto, tensors: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` that computes the named ``tensors`` (its outputs) and nothing else.

    Only the nodes the tensors depend on are kept, in their order, with the initializers they
    read: a group whose Linears sit in the first layers does not run the layers after them. The
    kept nodes are the same nodes with the same inputs, so ONNX Runtime computes the same values
    (``tests/export/test_gptq_probe.py`` checks the Hessians bit for bit against the whole graph's).
    The graph is copied with its weights set aside (``without_weights``): only the kept ones are
    copied back, not every weight of the model.
    """
    needed, kept = set(tensors), []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed |= _names_read(node)

    def pruned_copy(weightless: onnx.ModelProto) -> onnx.ModelProto:
        probe = onnx.ModelProto()
        probe.CopyFrom(weightless)
        graph = probe.graph
        del graph.node[:]
        graph.node.extend(reversed(kept))
        initializers = [init for init in graph.initializer if init.name in needed]
        del graph.initializer[:]
        graph.initializer.extend(initializers)
        del graph.output[:]
        graph.output.extend(helper.make_empty_tensor_value_info(t) for t in sorted(tensors))
        return probe

    return without_weights(pruned_copy, model)


def _hessians(model: onnx.ModelProto, tensors: set[str], feeds: Feeds,
              hold: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, np.ndarray]:
    """2/n X^T X of every named activation over its n rows (tokens; padding tokens dropped), ``hold``
    entered per feed.

    Each feed holds the graph's inputs and an ``attention_mask`` marking the real tokens.
    """
    import onnxruntime as ort

    probe = hessian_probe(model, tensors)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # see _single_threaded
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for feed in feeds:
        with hold():
            feed = with_empty_past(session.get_inputs(), feed)  # a decoder's cache inputs, empty
            outputs = session.run(sorted(tensors), {k: v for k, v in feed.items() if k in inputs})
            keep = np.asarray(feed["attention_mask"]).astype(bool)  # drop padding tokens
            for name, value in zip(sorted(tensors), outputs, strict=True):
                x = value[keep] if value.shape[:2] == keep.shape else value.reshape(-1, value.shape[-1])
                x = x.astype(np.float64)
                sums[name] = sums.get(name, 0.0) + x.T @ x
                rows[name] = rows.get(name, 0) + len(x)
    return {name: 2.0 * total / max(rows[name], 1) for name, total in sums.items()}


def _inverse_factor(hessian: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor U of the damped inverse Hessian (H^-1 = U^T U), as GPTQ uses it."""
    h = hessian.copy()
    dead = np.diag(h) == 0  # inputs that were always 0: their weights are rounded, nothing to compensate
    h[dead, dead] = 1.0
    for damping in (GPTQ_DAMPING, 0.1, 1.0):  # more damping when the Hessian is too ill-conditioned
        try:
            damped = h + damping * np.mean(np.diag(h)) * np.eye(len(h))
            return np.linalg.cholesky(np.linalg.inv(damped)).T
        except np.linalg.LinAlgError:
            continue
    raise ExportError("GPTQ: the calibration Hessian is singular even with strong damping")


def _gptq(weight: np.ndarray, upper: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, ...]:
    """GPTQ (Frantar et al. 2023) of a (K, N) MatMul weight: codes (K, N), scales and zero points (K/block, N).

    Rows (input features) are quantized in order; each one's rounding error, weighted by the
    inverse Hessian factor ``upper``, is pushed onto the rows not yet quantized. Scales and zero
    points are fixed per block when the quantization reaches it (asymmetric, the range always
    includes 0, as in ONNX Runtime's round-to-nearest).
    """
    w = weight.astype(np.float64).copy()
    k, n = w.shape
    maxq = 2 ** bits - 1
    blocks = math.ceil(k / block)
    codes = np.zeros((k, n), np.uint8)
    scales, zeros = np.zeros((blocks, n)), np.zeros((blocks, n))
    for b in range(blocks):
        i1, i2 = b * block, min((b + 1) * block, k)
        part = w[i1:i2]
        low, high = np.minimum(part.min(0), 0.0), np.maximum(part.max(0), 0.0)
        scale = np.where(high > low, (high - low) / maxq, 1.0)
        zero = np.clip(np.round(-low / scale), 0, maxq)
        errors = np.zeros_like(part)
        for i in range(i2 - i1):
            q = np.clip(np.round(part[i] / scale) + zero, 0, maxq)
            codes[i1 + i] = q
            errors[i] = (part[i] - scale * (q - zero)) / upper[i1 + i, i1 + i]
            part[i:] -= np.outer(upper[i1 + i, i1 + i:i2], errors[i])
        w[i2:] -= upper[i1:i2, i2:].T @ errors
        scales[b], zeros[b] = scale, zero
    return codes, scales, zeros.astype(np.uint8)


def _gptq_matmuls(model: onnx.ModelProto, nodes: set[str], bits: int, block: int, feeds: Feeds,
                  accuracy_level: int, hold: Callable[[], AbstractContextManager] = nullcontext) -> onnx.ModelProto:
    """Replace each named MatMul by a MatMulNBits node holding its GPTQ weights (one-shot Hessians);
    ``hold`` entered around each step (a calibration batch, a Hessian's factor, a Linear)."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    targets = [n for n in graph.node if n.name in nodes]
    if any(n.op_type != "MatMul" or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2 for n in targets):
        raise ExportError("GPTQ quantizes only MatMul nodes with a constant 2-D weight")
    factors = {}
    for name, h in _hessians(model, {n.input[0] for n in targets}, feeds, hold).items():
        with hold():
            factors[name] = _inverse_factor(h)
    replacement = {}
    for node in targets:
        weight = numpy_helper.to_array(inits[node.input[1]])
        k, n = weight.shape
        with hold():
            codes, scales, zeros = _gptq(weight, factors[node.input[0]], bits, block)
        blocks = scales.shape[0]
        codes = np.concatenate([codes, np.repeat(zeros[-1:], blocks * block - k, axis=0)])  # pad: dequantizes to 0
        packed = pack_bits(codes.T.reshape(n, blocks, block), bits)
        base = node.input[1]
        graph.initializer.extend([
            numpy_helper.from_array(packed, f"{base}_Q{bits}"),
            numpy_helper.from_array(scales.T.astype(weight.dtype), f"{base}_scales"),
            numpy_helper.from_array(pack_bits(zeros.T, bits), f"{base}_zero_points"),
        ])
        extra = {"accuracy_level": accuracy_level} if accuracy_level else {}
        replacement[node.name] = helper.make_node(
            "MatMulNBits", [node.input[0], f"{base}_Q{bits}", f"{base}_scales", f"{base}_zero_points"],
            list(node.output), name=f"{node.name}_Q{bits}", domain="com.microsoft", K=k, N=n, bits=bits,
            block_size=block, **extra)
    kept = [replacement.get(n.name, n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input}
    for name in {n.input[1] for n in targets} - used:
        graph.initializer.remove(inits[name])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _table_lookups(model: onnx.ModelProto, weight_name: str) -> list[int]:
    """Positions of the Gathers reading ``weight_name``; an error when anything else reads it."""
    if weight_name not in {init.name for init in model.graph.initializer}:
        raise ExportError(f"embedding weight {weight_name!r} is not an initializer of the exported graph")
    nodes = list(model.graph.node)
    consumers = [i for i, n in enumerate(nodes) if weight_name in n.input]
    if any(nodes[i].op_type != "Gather" or nodes[i].input[0] != weight_name for i in consumers):
        raise ExportError(f"embedding weight {weight_name!r} is used by more than lookups (tied weights?); "
                          "plan it as fp32")
    return consumers


def quantize_int4_embedding(model: onnx.ModelProto, weight_name: str, block_size: int) -> onnx.ModelProto:
    """Blockwise 4-bit table ``weight_name`` (blocks along the hidden size) read by GatherBlockQuantized."""
    lookups = [model.graph.node[i].name for i in _table_lookups(model, weight_name)]
    if len(lookups) != 1 or not lookups[0]:
        raise ExportError(f"a 4-bit embedding table needs exactly one named lookup; {weight_name!r} has {lookups}")
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < INT4_TABLE_OPSET:
        model = without_weights(lambda graph: version_converter.convert_version(graph, INT4_TABLE_OPSET), model)
    model.ir_version = max(model.ir_version, 10)  # uint4 tensors need IR version 10 as well
    quantizer = _matmulnbits_quantizer()(
        model, bits=4, block_size=block_size, is_symmetric=False, op_types_to_quantize=("Gather",),
        nodes_to_exclude=sorted(_names(model, "Gather") - set(lookups)),
    )
    with _quiet():
        quantizer.process()
    return quantizer.model.model


def quantize_int8_embedding(model: onnx.ModelProto, weight_name: str) -> onnx.ModelProto:
    """Store the embedding table ``weight_name`` as int8 rows with one fp32 scale per row."""
    consumers = set(_table_lookups(model, weight_name))  # positions: protobuf wrappers are not stable
    inits = {init.name: init for init in model.graph.initializer}
    table = numpy_helper.to_array(inits[weight_name]).astype(np.float32)
    scale = np.maximum(table.max(axis=1, keepdims=True), -table.min(axis=1, keepdims=True)) / np.float32(127.0)
    scale[scale == 0] = 1.0
    # in place: one temporary the table's size instead of four (fresh memory is slow on some VMs)
    codes = np.divide(table, scale)
    np.rint(codes, out=codes)
    np.clip(codes, -127, 127, out=codes)
    quantized = codes.astype(np.int8)
    q_name, s_name = f"{weight_name}_int8", f"{weight_name}_row_scale"
    model.graph.initializer.remove(inits[weight_name])
    model.graph.initializer.extend([
        numpy_helper.from_array(quantized, q_name), numpy_helper.from_array(scale.astype(np.float32), s_name),
    ])
    new_nodes = []
    for i, node in enumerate(model.graph.node):
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


def quantize_embedding(model: onnx.ModelProto, weight_name: str, weight_format: str, block_size: int = 32,
                       method: str = "rtn") -> onnx.ModelProto:
    """The lookup format a plan asks for one table: int8 rows or a 4-bit round-to-nearest block table."""
    if weight_format == "int8":
        return quantize_int8_embedding(model, weight_name)
    if weight_format == "int4" and method == "rtn":
        return quantize_int4_embedding(model, weight_name, block_size)
    raise ExportError(f"embedding {weight_name!r}: ONNX Runtime reads tables as int8 rows or 4-bit round-to-nearest "
                      f"blocks (GatherBlockQuantized), not {weight_format} / {method}")
