"""Passes run with the weights set aside give the model they give with the weights, byte for byte."""

from __future__ import annotations

import onnx
from onnx import version_converter

from slimtune.export.onnx_export import export_fp32
from slimtune.export.weightless import SET_ASIDE_BYTES, put_weights_back, set_weights_aside, without_weights


def _exported(bert, tmp_path) -> onnx.ModelProto:
    return onnx.load(str(export_fp32(bert, tmp_path / "fp32.onnx")))


def test_shape_inference_and_version_conversion_without_weights_match_the_full_passes(bert, tmp_path):
    model = _exported(bert, tmp_path)
    before = model.SerializeToString()
    for graph_pass in (onnx.shape_inference.infer_shapes, lambda m: version_converter.convert_version(m, 21)):
        expected = graph_pass(onnx.load_from_string(before)).SerializeToString()
        assert without_weights(graph_pass, model).SerializeToString() == expected
        assert model.SerializeToString() == before  # the caller's model is left as it was


def test_only_large_initializers_are_set_aside_and_all_come_back(bert, tmp_path):
    model = _exported(bert, tmp_path)
    before = model.SerializeToString()
    aside = set_weights_aside(model)
    assert aside and all(len(data) >= SET_ASIDE_BYTES for data in aside.values())
    assert all(not init.raw_data for init in model.graph.initializer if init.name in aside)
    kept = [init for init in model.graph.initializer if init.name not in aside]
    assert all(len(init.raw_data) < SET_ASIDE_BYTES for init in kept)
    assert len(model.SerializeToString()) < len(before) - sum(map(len, aside.values())) + 1000
    assert put_weights_back(model, aside).SerializeToString() == before


def test_weights_come_back_marked_as_a_reload_marks_them(bert, tmp_path):
    model = _exported(bert, tmp_path)
    aside = set_weights_aside(model)
    put_weights_back(model, aside, as_reloaded=True)
    restored = [init for init in model.graph.initializer if init.name in aside]
    assert all(init.HasField("data_location") and init.data_location == onnx.TensorProto.DEFAULT for init in restored)
