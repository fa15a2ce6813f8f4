"""Kernel modes: chosen by measured speed within a quality tolerance of the exact mode, applied to the
bytes of every blockwise layer, recorded and read back."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper

from slimtune.config import LatencyConfig
from slimtune.evaluators.kernel_modes import (
    CANDIDATES,
    COMPUTE_BOUND_ROWS,
    ModeFigures,
    blockwise_probe,
    choose_modes,
    measured_modes,
)
from slimtune.export import build_artifact
from slimtune.export.modes import EXACT, KernelModes
from slimtune.layout import discover_layout
from slimtune.model import OutputSpec
from slimtune.plan import CompressionPlan, QuantSpec
from slimtune.tasks import PreparedTask
from slimtune.tasks.causal_lm import windows
from tests.conftest import tiny_llama


def _figures(bits: int, values: dict[tuple[int, bool], tuple[float, float]]) -> list[ModeFigures]:
    return [ModeFigures(bits, level, symmetric, metric, ms) for (level, symmetric), (metric, ms) in values.items()]


def test_the_fastest_mode_within_tolerance_wins_and_a_lossy_one_loses():
    figures = _figures(4, {(0, False): (30.0, 10.0), (4, False): (30.2, 6.0), (0, True): (31.0, 9.0),
                           (4, True): (33.0, 5.0)})
    # perplexity (minimised): +0.7% holds the 1% tolerance, +10% does not
    assert choose_modes(figures, "min") == KernelModes(levels=((4, 4),))
    # with a tolerance of 0.5% only the exact mode holds
    assert choose_modes(figures, "min", tolerance=0.005) == EXACT
    # accuracy (maximised): higher is better, the symmetric fast mode holds within 1 point
    accuracy = _figures(4, {(0, False): (0.95, 10.0), (4, False): (0.90, 6.0), (0, True): (0.949, 9.0),
                            (4, True): (0.946, 5.0)})
    assert choose_modes(accuracy, "max") == KernelModes(levels=((4, 4),), symmetric=(4,))


def test_modes_slower_than_exact_need_no_score():
    nan = float("nan")
    # the exact mode is the fastest: chosen without any scoring
    assert choose_modes(_figures(4, {(0, False): (nan, 5.0), (4, False): (nan, 6.0), (0, True): (nan, 7.0)}),
                        "min") == EXACT
    # the fastest mode holds; the ones behind it were never scored
    figures = _figures(4, {(0, False): (30.0, 10.0), (4, False): (30.1, 6.0), (0, True): (nan, 8.0),
                           (4, True): (nan, 11.0)})
    assert choose_modes(figures, "min") == KernelModes(levels=((4, 4),))


def test_a_mode_the_runtime_refuses_is_left_out():
    figures = [*_figures(2, {(0, False): (40.0, 10.0), (0, True): (40.1, 9.0)}),
               ModeFigures(2, 4, False, float("nan"), float("nan"), "not implemented")]
    assert choose_modes(figures, "min") == KernelModes(symmetric=(2,))


def test_modes_round_trip_and_describe_themselves():
    modes = KernelModes(levels=((4, 4), (2, 0)), symmetric=(4,))
    assert KernelModes.loads(modes.dumps()) == modes and modes.level(2) == 0
    assert KernelModes.loads("") == EXACT and "exact" in EXACT.describe()
    assert modes.describe() == "4-bit level 4 symmetric"
    with pytest.raises(ValueError, match="accuracy levels"):
        KernelModes(levels=((4, 7),))


def _nbits_nodes(path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]


def test_modes_reach_every_blockwise_kernel(tmp_path):
    model = tiny_llama(300)
    layout = discover_layout(model)
    plan = CompressionPlan(quantize={n: QuantSpec("int4") for n in layout.linears})
    exact = build_artifact(model, plan, tmp_path / "exact.onnx", output=OutputSpec("lm"))
    fast = build_artifact(model, plan, tmp_path / "fast.onnx", output=OutputSpec("lm"),
                          modes=KernelModes(levels=((4, 4),), symmetric=(4,)))
    for node in _nbits_nodes(exact.path):
        assert {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("accuracy_level", 0) == 0
        assert len(node.input) == 4  # zero points
    for node in _nbits_nodes(fast.path):
        assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["accuracy_level"] == 4
        assert len(node.input) == 3  # symmetric: no zero points
    assert fast.size_bytes < exact.size_bytes


def _tiny_lm_modes_inputs():
    """(tiny causal LM, its task of six 16-token windows, a short generation timing, its feeds)."""
    model = tiny_llama(300)
    ids, targets = windows(np.random.default_rng(0).integers(0, 300, 6 * 16 + 1).astype(np.int64), 16, 16)
    none = np.zeros((0, 16), np.int64)
    task = PreparedTask(kind="causal-lm", metric="perplexity", metric_reason="", output=OutputSpec("lm"),
                        input_ids=ids, attention_mask=np.ones_like(ids), calibration_ids=none, calibration_mask=none,
                        train_ids=none, train_mask=none, train_targets=None, labels=targets,
                        reference_outputs=np.zeros_like(targets))
    latency = LatencyConfig(batch_size=1, sequence_length=8, new_tokens=4, warmup_runs=0, timed_runs=3)
    return model, task, latency, {"input_ids": ids[:1, :8], "attention_mask": np.ones((1, 8), np.int64)}


def test_measured_modes_cover_every_candidate_and_are_cached(tmp_path):
    model, task, latency, feeds = _tiny_lm_modes_inputs()
    cache = tmp_path / "modes.json"
    modes, figures = measured_modes(model, task, discover_layout(model).linears, (4,), 32, feeds, latency, 1, cache)
    assert [(f["level"], f["symmetric"]) for f in figures] == list(CANDIDATES)
    timed = sorted((f for f in figures if not f["error"]), key=lambda f: f["latency_ms"])
    assert timed and all(f["latency_ms"] > 0 for f in timed)
    exact = next(f for f in timed if (f["level"], f["symmetric"]) == CANDIDATES[0])
    faster = timed[:timed.index(exact)]
    # scored only as far as the choice needs: nothing slower than the exact mode, and the exact
    # mode itself only when something is faster
    assert all(f["metric"] is None for f in timed[timed.index(exact) + 1:])
    assert (exact["metric"] is not None) == bool(faster)
    assert all(np.isfinite(f["metric"]) for f in timed if f["metric"] is not None)
    chosen = [(modes.level(4), modes.is_symmetric(4))]
    assert chosen[0] in [(f["level"], f["symmetric"]) for f in timed[:timed.index(exact) + 1]]
    assert cache.is_file() and not list(tmp_path.glob("*.work"))
    again, _ = measured_modes(model, task, (), (4,), 32, feeds, latency, 1, cache)  # no linears: must come from cache
    assert again == modes


def test_modes_change_nothing_without_blockwise_weights(tmp_path):
    """A trial whose plan has no blockwise weights is built before the modes are measured: its
    bytes must be the same under any modes."""
    from slimtune.search.trial import plan_bit_widths

    model = tiny_llama(300)
    layout = discover_layout(model)
    # int8 Linears and a 4-bit table (GatherBlockQuantized reads no kernel mode)
    plan = CompressionPlan(quantize={**{n: QuantSpec("int8") for n in layout.linears},
                                     layout.embedding: QuantSpec("int4", 32)})
    assert plan_bit_widths(plan, layout) == ()
    exact = build_artifact(model, plan, tmp_path / "exact.onnx", output=OutputSpec("lm"))
    fast = build_artifact(model, plan, tmp_path / "fast.onnx", output=OutputSpec("lm"),
                          modes=KernelModes(levels=((4, 4),), symmetric=(4,)))
    assert exact.path.read_bytes() == fast.path.read_bytes()
    assert "GatherBlockQuantized" in exact.kernels
    mixed = CompressionPlan(quantize={**plan.quantize, layout.linears[0]: QuantSpec("int4")})
    assert plan_bit_widths(mixed, layout) == (4,)


def test_modes_are_timed_after_the_exact_one_and_bounded_by_it(tmp_path, monkeypatch):
    import slimtune.evaluators.kernel_modes as kernel_modes

    model, task, latency, feeds = _tiny_lm_modes_inputs()
    bounds, measure = [], kernel_modes.measure_latency

    def recorded(*args, slower_than=None, **kwargs):
        bounds.append(slower_than)
        return measure(*args, slower_than=slower_than, **kwargs)

    monkeypatch.setattr(kernel_modes, "measure_latency", recorded)
    figures = kernel_modes.measure_modes(model, task, discover_layout(model).linears, (4,), 32, feeds, latency, 1,
                                         tmp_path / "work")
    exact = next(f for f in figures if f.mode == CANDIDATES[0])
    assert bounds == [None] + [exact.latency_ms] * (len(CANDIDATES) - 1)


def _kernel_shapes(model: onnx.ModelProto) -> list[tuple[int, int]]:
    return sorted((a["K"], a["N"]) for a in ({x.name: helper.get_attribute_value(x) for x in n.attribute}
                                             for n in model.graph.node if n.op_type == "MatMulNBits"))


def test_the_modes_probe_holds_one_layer_of_blockwise_kernels_and_computes_them(tmp_path):
    import onnxruntime as ort

    model = tiny_llama(300)
    layout = discover_layout(model)
    blocks = [n for n in layout.linears if ".layers." in n]
    layers = len({n.split(".layers.")[1].split(".")[0] for n in blocks})
    assert layers > 1
    built = onnx.load(str(build_artifact(model, CompressionPlan(quantize={n: QuantSpec("int4") for n in blocks}),
                                         tmp_path / "int4.onnx", output=OutputSpec("lm")).path))
    rows = COMPUTE_BOUND_ROWS
    probe, feeds = blockwise_probe(built, rows=rows)
    whole, unit = Counter(_kernel_shapes(built)), Counter(_kernel_shapes(probe))
    assert {k: v * layers for k, v in unit.items()} == dict(whole)  # one layer, each kernel as often as in it
    assert {n.op_type for n in probe.graph.node} == {"MatMulNBits"}
    assert all(v.shape == (rows, int(k[1:])) and v.dtype == np.float32 for k, v in feeds.items())
    # a generated token's kernels read their weights from memory: one layer's, held in cache, would
    # run faster than the model's do, so every kernel stays
    assert _kernel_shapes(blockwise_probe(built, rows=1)[0]) == _kernel_shapes(built)
    # the build's own kernels: the same weights and attributes, and they run on the probe's rows
    built_inits = {i.name: i for i in built.graph.initializer}
    probe_inits = {i.name: i for i in probe.graph.initializer}
    originals = {tuple(n.input[1:]): n for n in built.graph.node if n.op_type == "MatMulNBits"}
    for node in probe.graph.node:
        assert list(node.attribute) == list(originals[tuple(node.input[1:])].attribute)
        assert all(probe_inits[name] == built_inits[name] for name in node.input[1:] if name)
    outputs = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert all(o.shape[0] == rows and np.all(np.isfinite(o)) for o in outputs)
    # counts without a common divisor (one layer's down projection left fp32) leave no smaller unit
    uneven = CompressionPlan(quantize={n: QuantSpec("int4") for n in blocks if n != "model.layers.0.mlp.down_proj"})
    assert len(uneven.quantize) == len(blocks) - 1
    built = onnx.load(str(build_artifact(model, uneven, tmp_path / "uneven.onnx", output=OutputSpec("lm")).path))
    assert _kernel_shapes(blockwise_probe(built, rows=rows)[0]) == _kernel_shapes(built)
    with pytest.raises(ValueError, match="no MatMulNBits"):
        blockwise_probe(onnx.load(str(build_artifact(model, CompressionPlan(), tmp_path / "fp32.onnx",
                                                     output=OutputSpec("lm")).path)), rows=rows)
