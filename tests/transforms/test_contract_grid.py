"""The contract for the ``grid`` method: weights already on a 4-bit block grid (what a model
dequantized from a Q4_1 / Q4_0 GGUF holds) are stored as MatMulNBits with their own codes and
scales plus the exact remainder product, so the file reproduces the model up to float rounding,
where round-to-nearest rounds a second time; off-grid weights fall back to round-to-nearest."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from slimtune.export import build_artifact, predict_size_bytes
from slimtune.export.grid import find_grid
from slimtune.layout import discover_layout
from slimtune.plan import CompressionPlan, QuantSpec
from tests.transforms.test_contract_quant import ATTENTION_MATMULS, _initializer_bytes, _uniform


def _snap_to_grid(model: torch.nn.Module, block: int = 32, seed: int = 0) -> torch.nn.Module:
    """Every Linear's weight rounded onto a Q4_1 grid (per block of inputs: scale and float minimum)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name in discover_layout(model).linears:
            weight = model.get_submodule(name).weight  # (out, in): blocks run along the inputs
            w = weight.numpy().reshape(weight.shape[0], -1, block)
            low, high = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
            step = (high - low) / 15
            codes = np.round((w - low) / step)
            codes[..., rng.integers(0, block)] = 15  # both ends of the grid used, as a Q4_1 quantizer does
            codes[..., 0] = 0
            weight.copy_(torch.from_numpy((low + step * codes).reshape(weight.shape).astype(np.float32)))
    return model


def test_find_grid_recovers_q4_1_and_q4_0_blocks_and_refuses_others():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (64, 5))
    codes[0], codes[32], codes[1], codes[33] = 0, 0, 15, 15
    q4_1 = 0.02 * codes - 0.13  # scale 0.02, float minimum -0.13
    grid = find_grid(q4_1.astype(np.float32), 32)
    assert grid is not None
    codes, zero_points = grid.codes.astype(np.float64), grid.zero_points.astype(np.float64).repeat(32, 0)
    rebuilt = grid.scales.repeat(32, 0) * (codes - zero_points) + grid.remainders.repeat(32, 0)
    np.testing.assert_allclose(rebuilt, q4_1, atol=1e-6)
    assert np.abs(grid.remainders).max() <= 0.01 + 1e-7  # the nearest integer zero point: at most half a step
    q4_0 = 0.05 * (np.clip(rng.integers(0, 16, (32, 3)), 2, 13) - 8)  # codes 2..13 of 0..15: a span of 11
    assert np.allclose(find_grid(q4_0.astype(np.float32), 32).scales, 0.05)
    assert find_grid(rng.standard_normal((64, 4)).astype(np.float32), 32) is None
    assert find_grid(q4_1[:48].astype(np.float32), 32) is None  # K not a whole number of blocks
    wide = 0.02 * rng.integers(0, 16, (64, 300)) - 0.13  # wider than the columns probed first
    assert find_grid(wide.astype(np.float32), 32) is not None
    wide[40, 250] += 0.007  # one value off the grid, past the probe
    assert find_grid(wide.astype(np.float32), 32) is None


def test_grid_weights_are_stored_exactly(arch, tiny_model, contract, tmp_path):
    model = _snap_to_grid(tiny_model(arch))
    plan = _uniform(model, QuantSpec("int4", 32, "grid"))
    linears = len(discover_layout(model).linears)
    contract(model, plan, tmp_path, 0.99999, {"MatMulNBits": linears, "MatMul": ATTENTION_MATMULS + linears})
    rtn = build_artifact(model, _uniform(model, QuantSpec("int4", 32, "rtn")), tmp_path / "rtn.onnx")
    grid = build_artifact(model, plan, tmp_path / "grid.onnx")
    fp32 = build_artifact(model, CompressionPlan(), tmp_path / "fp32.onnx")
    measured = _initializer_bytes(grid.path) - _initializer_bytes(fp32.path)
    predicted = predict_size_bytes(model, plan) - predict_size_bytes(model, CompressionPlan())
    assert measured == predicted + (4 + 1) * 8  # and the graph's two shared int64 constants of the block sums
    assert grid.size_bytes > rtn.size_bytes  # the remainders: one float per block and output


def test_off_grid_weights_fall_back_to_round_to_nearest(tmp_path, tiny_model):
    model = tiny_model("bert")  # random weights: on no grid
    grid = build_artifact(model, _uniform(model, QuantSpec("int4", 32, "grid")), tmp_path / "grid.onnx")
    rtn = build_artifact(model, _uniform(model, QuantSpec("int4", 32, "rtn")), tmp_path / "rtn.onnx")
    assert grid.path.read_bytes() == rtn.path.read_bytes()
    assert not any(n.name.endswith("_grid_remainder") for n in onnx.load(str(grid.path)).graph.node)


def test_grid_is_unchanged_by_the_plan_digest_rules():
    spec = QuantSpec("int4", 32, "grid")
    assert CompressionPlan.loads(CompressionPlan(quantize={"a": spec}).dumps()).quantize["a"] == spec
