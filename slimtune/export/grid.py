"""4-bit weights faithful to a 4-bit source: keep a GGUF block grid instead of rounding it again.

A model loaded from a 4-bit GGUF file (Q4_1, Q4_0, ...) holds weights that are already on a grid:
per block of 32 inputs of an output, ``w = d * q + m`` with integer codes ``q`` in 0..15, a scale
``d`` and a float minimum ``m``. MatMulNBits stores ``w = s * (c - z)`` with an *integer* zero
point ``z``, so any re-encoding rounds a second time (round-to-nearest finds ``s = d`` and the
nearest ``z``, and leaves every weight of the block off by the same ``m + d * z``: that shared
offset is what costs Q4_1 models a third of their perplexity under plain 4-bit).

The ``grid`` method keeps the source's codes and scales, takes the nearest integer zero point,
and adds the per-block remainder ``r = m + d * z`` back exactly: ``x @ W = MatMulNBits(x) +
S(x) @ R``, where ``S(x)`` sums ``x`` over each block of 32 inputs (one Reshape + ReduceSum,
shared by every product that reads the same input; activations are (batch, sequence, K), as in
every graph slimtune exports) and ``R`` is the (K / block, N) matrix of
remainders, a small fp32 MatMul. The result equals the source up to float rounding, at the price
of those extra nodes and of ``R``'s bytes (as many as the scales). A weight that is not on a 4-bit
grid of the block size (a Q8_0 table, a trained fp32 model) is rounded to nearest like ``rtn``.

Detection needs no GGUF reader: a block is on a grid when, for some span k in 1..15, every value
sits within 1e-3 steps of ``min + d * integer`` with ``d = (max - min) / k``; the smallest such k
(the coarsest grid) is the source's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from slimtune.export.onnx_export import ExportError

GRID_TOLERANCE = 1e-3  # fraction of one grid step
LEVELS = 16


@dataclass(frozen=True)
class GridCodes:
    """A (K, N) weight on a 4-bit grid: ``codes`` (K, N) in 0..15, per block of ``block`` inputs and per
    output ``scales`` and integer ``zero_points`` (blocks, N), and the ``remainders`` (blocks, N) that
    make ``scales * (codes - zero_points) + remainders`` the weight."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    remainders: np.ndarray


PROBE_COLUMNS = 64  # columns checked first: an off-grid matrix (a Q8_0 table, a distilled weight) fails there


def _block_steps(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray | None:
    """The grid step of every (block, column) of ``values`` (blocks, block, columns; ``low`` and
    ``high`` its minima and maxima per block): the smallest span 1..15 whose step puts all of the
    block's values on the grid; None when a block has none."""
    scales = np.zeros_like(low)
    found = high == low  # a constant block: code 0, scale 1, all of it in the remainder
    for span in range(1, LEVELS):
        step = np.where(found, 1.0, (high - low) / span)
        steps = (values - low[:, None]) / np.where(step == 0, 1.0, step)[:, None]
        fits = (np.abs(steps - np.round(steps)).max(axis=1) <= GRID_TOLERANCE) & ~found
        scales = np.where(fits, step, scales)
        found |= fits
    return np.where(high == low, 1.0, scales) if found.all() else None


def find_grid(weight: np.ndarray, block: int) -> GridCodes | None:
    """The 4-bit grid of a (K, N) weight in blocks of ``block`` along K, or None when a block is off it.

    The first ``PROBE_COLUMNS`` columns are checked first, so an off-grid matrix is refused after a
    sliver of the work (SmolLM2's 28M-value table: milliseconds instead of seconds)."""
    k, n = weight.shape
    if k % block:
        return None
    if n > PROBE_COLUMNS:
        probe = weight[:, :PROBE_COLUMNS].astype(np.float64).reshape(k // block, block, PROBE_COLUMNS)
        if _block_steps(probe, probe.min(axis=1), probe.max(axis=1)) is None:
            return None
    values = weight.astype(np.float64).reshape(k // block, block, n)
    low = values.min(axis=1)
    scales = _block_steps(values, low, values.max(axis=1))
    if scales is None:
        return None
    codes = np.round((values - low[:, None]) / scales[:, None])
    zero_points = np.clip(np.round(-low / scales), 0, LEVELS - 1)
    remainders = low + scales * zero_points
    return GridCodes(codes=codes.reshape(k, n).astype(np.uint8), scales=scales.astype(np.float32),
                     zero_points=zero_points.astype(np.uint8), remainders=remainders.astype(np.float32))


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values along the last axis, first value in the lowest bits (MatMulNBits)."""
    per = 8 // bits
    padded = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, -values.shape[-1] % per)])
    grouped = padded.reshape(*padded.shape[:-1], -1, per).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << (bits * np.arange(per, dtype=np.uint8)), axis=-1).astype(np.uint8)


def _block_constants(graph: onnx.GraphProto, block: int) -> tuple[str, str]:
    """The graph's one (batch, sequence, blocks, block) Reshape shape and ReduceSum axis, added once."""
    shape, axes = f"grid_blocks_shape_{block}", "grid_block_axis"
    present = {i.name for i in graph.initializer}
    if shape not in present:
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1, block], np.int64), shape))
    if axes not in present:
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
    return shape, axes


def grid_matmuls(model: onnx.ModelProto, nodes: set[str], block: int, accuracy_level: int) -> set[str]:
    """Replace each named MatMul whose weight is on a 4-bit grid by MatMulNBits plus its remainder
    product (module docstring); returns the names it could not encode (not on a grid)."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    block_sums: dict[tuple[str, int], str] = {}  # (input tensor, block) -> its block sums, computed once
    left, replaced = set(), {}
    for node in [n for n in graph.node if n.name in nodes]:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            raise ExportError(f"the grid method encodes MatMul nodes with a constant weight, not {node.name!r}")
        weight = numpy_helper.to_array(inits[node.input[1]])
        grid = find_grid(weight, block)
        if grid is None:
            left.add(node.name)
            continue
        k, n = weight.shape
        base, x = node.input[1], node.input[0]
        graph.initializer.extend([
            numpy_helper.from_array(pack_bits(grid.codes.T.reshape(n, k // block, block), 4), f"{base}_Q4"),
            numpy_helper.from_array(grid.scales.T.copy(), f"{base}_scales"),
            numpy_helper.from_array(pack_bits(grid.zero_points.T, 4), f"{base}_zero_points"),
        ])
        extra = {"accuracy_level": accuracy_level} if accuracy_level else {}
        product = f"{node.output[0]}_grid"
        new = [helper.make_node("MatMulNBits", [x, f"{base}_Q4", f"{base}_scales", f"{base}_zero_points"], [product],
                                name=f"{node.name}_Q4", domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                                **extra)]
        if np.any(grid.remainders):
            if (x, block) not in block_sums:
                shape, axes = _block_constants(graph, block)
                new[:0] = [helper.make_node("Reshape", [x, shape], [f"{x}_blocks"], name=f"{node.name}_grid_blocks"),
                           helper.make_node("ReduceSum", [f"{x}_blocks", axes], [f"{x}_block_sums"],
                                            name=f"{node.name}_grid_block_sums", keepdims=0)]
                block_sums[(x, block)] = f"{x}_block_sums"
            graph.initializer.append(numpy_helper.from_array(grid.remainders, f"{base}_remainders"))
            new += [helper.make_node("MatMul", [block_sums[(x, block)], f"{base}_remainders"], [f"{product}_rest"],
                                     name=f"{node.name}_grid_remainder"),
                    helper.make_node("Add", [product, f"{product}_rest"], list(node.output), name=f"{node.name}_grid_add")]
        else:
            new[0].output[0] = node.output[0]
        replaced[node.name] = new
    kept = [m for n in graph.node for m in replaced.get(n.name, [n])]
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input}
    for name in [i.name for i in graph.initializer if i.name in inits and i.name not in used]:
        graph.initializer.remove(inits[name])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return left
