"""The causal-LM export: one graph with a KV cache that matches torch in prefill and decode, for
uncompressed and pruned plans, with the tied LM head stored once while it stays fp32."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from slimtune.export import build_artifact
from slimtune.export.decoder import export_decoder, is_decoder, kv_shapes, with_empty_past
from slimtune.layout import discover_layout
from slimtune.model import OutputSpec
from slimtune.plan import CompressionPlan, QuantSpec
from slimtune.transforms import apply_structural, collect_calibration
from tests.conftest import tiny_llama

VOCAB = 300


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(VOCAB)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def _prefill_then_step(sess: ort.InferenceSession, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits of a prefill over all but the last token, logits of one cached step for the last one)."""
    outputs = [o.name for o in sess.get_outputs()]
    prefix = ids[:, :-1]
    logits, *cache = sess.run(outputs, with_empty_past(sess.get_inputs(), {
        "input_ids": prefix, "attention_mask": np.ones_like(prefix)}))
    feeds = {"input_ids": ids[:, -1:], "attention_mask": np.ones_like(ids),
             **{name.replace("present.", "past_key_values.", 1): v for name, v in zip(outputs[1:], cache, strict=True)}}
    step, *_ = sess.run(outputs, feeds)
    return logits, step


def test_prefill_and_cached_decode_match_torch(llama, tmp_path):
    path = export_decoder(llama, tmp_path / "decoder.onnx")
    sess = _session(path)
    assert is_decoder(sess.get_inputs())
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int64)
    expected = _torch_logits(llama, ids)
    prefill, step = _prefill_then_step(sess, ids)
    np.testing.assert_allclose(prefill, expected[:, :-1], atol=1e-4)
    np.testing.assert_allclose(step[:, 0], expected[:, -1], atol=1e-4)


def test_pruned_blocks_export_with_their_own_cache_shapes(llama, tmp_path):
    """Depth, grouped-query head and MLP pruning: every kept block exports with its own key/value heads,
    and the graph still matches the pruned torch model, cached or not."""
    layout = discover_layout(llama)
    first, second, third = (b.name for b in layout.blocks)
    plan = CompressionPlan(head_prune={first: 0.5}, ffn_prune={third: 0.5}, depth_prune=(second,))
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 10)).astype(np.int64)
    calibration = collect_calibration(llama, ids, np.ones_like(ids))
    pruned = apply_structural(llama, plan, calibration)
    assert kv_shapes(pruned) == ((1, 16), (2, 16))
    sess = _session(export_decoder(pruned, tmp_path / "pruned.onnx"))
    shapes = {i.name: i.shape for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    assert shapes["past_key_values.0.key"][1] == 1 and shapes["past_key_values.1.key"][1] == 2
    prefill, step = _prefill_then_step(sess, ids)
    expected = _torch_logits(pruned, ids)
    np.testing.assert_allclose(prefill, expected[:, :-1], atol=1e-4)
    np.testing.assert_allclose(step[:, 0], expected[:, -1], atol=1e-4)


def _tables(path) -> list[tuple[int, ...]]:
    """Shapes of the initializers as large as the embedding table (either orientation)."""
    model = onnx.load(str(path))
    return [tuple(i.dims) for i in model.graph.initializer if VOCAB in tuple(i.dims)]


def test_tied_lm_head_is_stored_once_in_fp32_and_quantized_on_its_own(llama, tmp_path):
    output = OutputSpec("lm")
    fp32 = build_artifact(llama, CompressionPlan(), tmp_path / "fp32.onnx", output=output)
    assert _tables(fp32.path) == [(VOCAB, 64)]
    declared = _session(fp32.path).get_modelmeta().custom_metadata_map["slimtune.kv_cache"]
    assert declared == ("shared-buffer" if fp32.exporter == "fused-decoder" else "concatenated")
    assert fp32.kernels.get("Transpose", 0) >= 1
    plan = CompressionPlan(quantize={"lm_head": QuantSpec("int4"), "model.embed_tokens": QuantSpec("int4")})
    int4 = build_artifact(llama, plan, tmp_path / "int4.onnx", output=output)
    assert int4.kernels["MatMulNBits"] == 1 and int4.kernels["GatherBlockQuantized"] == 1
    table_bytes = VOCAB * 64 * 4
    # Two 4-bit copies (head and lookup) still save more than half of the one fp32 table.
    assert fp32.size_bytes - int4.size_bytes > table_bytes / 2
    sess = _session(int4.path)
    ids = np.random.default_rng(2).integers(0, VOCAB, (1, 8)).astype(np.int64)
    logits = sess.run(["logits"], with_empty_past(sess.get_inputs(), {"input_ids": ids,
                                                                       "attention_mask": np.ones_like(ids)}))[0]
    expected = _torch_logits(llama, ids)
    cosine = np.sum(logits * expected, -1) / (np.linalg.norm(logits, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert cosine.min() > 0.95
