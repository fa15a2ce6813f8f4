"""GPTQ's Hessian probe runs only what its tensors depend on, and computes them as the whole graph does."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from slimtune.export.onnx_export import export_fp32
from slimtune.export.quantize import _hessians, calibration_feeds, hessian_probe


def _weight_matmuls(model: onnx.ModelProto, layer: str) -> list[onnx.NodeProto]:
    weights = {init.name for init in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights and f"/{layer}/" in n.name]


def _whole_graph_with_outputs(model: onnx.ModelProto, tensors: set[str]) -> onnx.ModelProto:
    """The whole graph with the named tensors as extra outputs: how the Hessians were read before."""
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    whole.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in sorted(tensors))
    return whole


def _run(model: onnx.ModelProto, names: list[str], ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {"input_ids": ids, "attention_mask": mask})


def test_the_probe_of_the_first_layer_runs_that_layer_only_and_gives_the_whole_graphs_values(bert, token_batch,
                                                                                            tmp_path):
    model = onnx.load(str(export_fp32(bert, tmp_path / "fp32.onnx")))
    first, second = _weight_matmuls(model, "layer.0"), _weight_matmuls(model, "layer.1")
    assert first and second
    tensors = {n.input[0] for n in first}
    before = model.SerializeToString()
    probe = hessian_probe(model, tensors)
    assert model.SerializeToString() == before  # the caller's model keeps its weights
    kept = {n.name for n in probe.graph.node}
    assert kept < {n.name for n in model.graph.node}
    assert not any("/layer.1/" in name for name in kept)  # the second layer is not run
    assert {o.name for o in probe.graph.output} == tensors
    assert {i.name for i in probe.graph.initializer} == {name for n in probe.graph.node for name in n.input} & {
        i.name for i in model.graph.initializer}  # the initializers the kept nodes read, no others

    whole = _whole_graph_with_outputs(model, tensors)
    ids, mask = token_batch
    for got, expected in zip(_run(probe, sorted(tensors), ids, mask), _run(whole, sorted(tensors), ids, mask),
                             strict=True):
        assert np.array_equal(got, expected)


def test_hessians_of_both_layers_match_those_read_from_the_whole_graph(bert, token_batch, tmp_path):
    model = onnx.load(str(export_fp32(bert, tmp_path / "fp32.onnx")))
    tensors = {n.input[0] for layer in ("layer.0", "layer.1") for n in _weight_matmuls(model, layer)}
    ids, mask = token_batch
    feeds = calibration_feeds(ids, mask, batch_size=2)
    hessians = _hessians(model, tensors, feeds)
    whole = _whole_graph_with_outputs(model, tensors)
    for name in sorted(tensors):
        rows = [value[feed["attention_mask"].astype(bool)].astype(np.float64)
                for feed in feeds for value in _run(whole, [name], feed["input_ids"], feed["attention_mask"])]
        total = sum(x.T @ x for x in rows)
        np.testing.assert_array_equal(hessians[name], 2.0 * total / sum(len(x) for x in rows))
