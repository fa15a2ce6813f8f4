"""The fused decoder export: GroupQueryAttention and fused RMS norms written block by block, equal to
torch in prefill and cached decode for Llama, Qwen2 (q/k/v biases) and Mistral (sliding window),
pruned shapes included (per-block heads, MLP widths, dropped blocks, factorised Linears), and the
default for those families in ``build_artifact``."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from slimtune.evaluators.latency import greedy_generation, shares_kv_buffer
from slimtune.export import build_artifact, exporter_for
from slimtune.export.decoder import export_decoder, with_empty_past
from slimtune.export.fused_decoder import export_fused_decoder, fusion_refusal
from slimtune.layout import decoder_geometry, discover_layout
from slimtune.model import OutputSpec
from slimtune.plan import CompressionPlan, QuantSpec
from slimtune.transforms import apply_structural, collect_calibration
from tests.conftest import tiny_llama

VOCAB = 300
LM = OutputSpec("lm")


def _tiny(kind: str):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if kind == "llama":
        return tiny_llama(VOCAB)
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rope_theta=500.0)
    if kind == "qwen2":  # q/k/v biases, untied head
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"]))
        with torch.no_grad():  # random biases: the default init leaves them 0, which would test nothing
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        return model.eval()
    # A window shorter than the test's sequences, so the window really cuts attention.
    config = MistralConfig(**shape, sliding_window=5, architectures=["MistralForCausalLM"])
    config._attn_implementation = "eager"
    return MistralForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def model(request):
    return _tiny(request.param)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        attention = None if mask is None else torch.from_numpy(mask)
        return model(input_ids=torch.from_numpy(ids), attention_mask=attention, use_cache=False).logits.numpy()


def _prefill_then_steps(sess, ids: np.ndarray, steps: int) -> np.ndarray:
    """Logits of a prefill over all but the last ``steps`` tokens, then one cached step per token."""
    outputs = [o.name for o in sess.get_outputs()]
    prefix = ids[:, :-steps]
    logits, *cache = sess.run(outputs, with_empty_past(sess.get_inputs(), {
        "input_ids": prefix, "attention_mask": np.ones_like(prefix)}))
    collected = [logits]
    for k in range(ids.shape[1] - steps, ids.shape[1]):
        feeds = {"input_ids": ids[:, k:k + 1], "attention_mask": np.ones((len(ids), k + 1), np.int64),
                 **{n.replace("present.", "past_key_values.", 1): v for n, v in zip(outputs[1:], cache, strict=True)}}
        logits, *cache = sess.run(outputs, feeds)
        collected.append(logits)
    return np.concatenate(collected, axis=1)


def test_prefill_and_cached_decode_match_torch(model, tmp_path):
    sess = _session(export_fused_decoder(model, tmp_path / "fused.onnx"))
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int64)
    np.testing.assert_allclose(_prefill_then_steps(sess, ids, 4), _torch_logits(model, ids), atol=1e-4)


def test_right_padded_rows_match_torch_at_their_real_tokens(model, tmp_path):
    sess = _session(export_fused_decoder(model, tmp_path / "fused.onnx"))
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 10)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    logits = sess.run(["logits"], with_empty_past(sess.get_inputs(), {"input_ids": ids, "attention_mask": mask}))[0]
    np.testing.assert_allclose(logits[0], _torch_logits(model, ids[:1])[0], atol=1e-4)
    np.testing.assert_allclose(logits[1, :6], _torch_logits(model, ids[1:, :6])[0], atol=1e-4)


def test_graph_is_one_attention_kernel_per_block_and_far_smaller_than_the_trace(model, tmp_path):
    fused = onnx.load(str(export_fused_decoder(model, tmp_path / "fused.onnx")))
    traced = onnx.load(str(export_decoder(model, tmp_path / "traced.onnx")))
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["GroupQueryAttention"] == 3 and ops["SkipSimplifiedLayerNormalization"] == 6
    assert ops["MatMul"] == 3 * 7 + 1  # seven Linears per block, and the LM head
    assert "Concat" not in ops and "Softmax" not in ops
    assert len(fused.graph.node) * 3 < len(traced.graph.node)
    assert shares_kv_buffer(tmp_path / "fused.onnx") and not shares_kv_buffer(tmp_path / "traced.onnx")


def test_pruned_shapes_match_torch_with_their_own_heads_per_block(model, tmp_path):
    """Grouped-query head pruning, MLP pruning, a dropped block and a factorised projection."""
    layout = discover_layout(model)
    first, second, third = (b.name for b in layout.blocks)
    plan = CompressionPlan(head_prune={third: 0.5}, ffn_prune={first: 0.5}, depth_prune=(second,),
                           low_rank={f"{third}.mlp.down_proj": 0.25})
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 12)).astype(np.int64)
    pruned = apply_structural(model, plan, collect_calibration(model, ids, np.ones_like(ids)))
    sess = _session(export_fused_decoder(pruned, tmp_path / "pruned.onnx"))
    kv = {i.name: i.shape[1] for i in sess.get_inputs() if i.name.endswith(".key")}
    assert kv == {"past_key_values.0.key": 2, "past_key_values.1.key": 1}
    heads = [a.i for n in onnx.load(str(tmp_path / "pruned.onnx")).graph.node if n.op_type == "GroupQueryAttention"
             for a in n.attribute if a.name == "num_heads"]
    assert heads == [4, 2]
    np.testing.assert_allclose(_prefill_then_steps(sess, ids, 3), _torch_logits(pruned, ids), atol=1e-4)


def test_generation_through_shared_buffers_equals_plain_runs(model, tmp_path):
    path = export_fused_decoder(model, tmp_path / "fused.onnx")
    sess = _session(path)
    prompt = np.random.default_rng(3).integers(0, VOCAB, (1, 7)).astype(np.int64)
    shared, _ = greedy_generation(sess, prompt, 6, share_buffer=True)
    bound, _ = greedy_generation(sess, prompt, 6, share_buffer=False)
    ids, expected = prompt, []
    for _ in range(6):
        token = int(_torch_logits(model, ids)[0, -1].argmax())
        expected.append(token)
        ids = np.concatenate([ids, [[token]]], axis=1)
    assert shared.tolist() == bound.tolist() == expected


def test_build_artifact_uses_the_fused_export_and_every_weight_format_applies(model, tmp_path):
    layout = discover_layout(model)
    quantize = {name: QuantSpec("int4" if i % 2 else "int8") for i, name in enumerate(layout.linears)}
    quantize[layout.output_head] = QuantSpec("int4")
    quantize[layout.embedding] = QuantSpec("int4")
    artifact = build_artifact(model, CompressionPlan(quantize=quantize), tmp_path / "mixed.onnx", output=LM)
    assert artifact.exporter == "fused-decoder"
    assert artifact.kernels["MatMulNBits"] == len(layout.linears) // 2 + 1
    assert artifact.kernels["MatMulInteger"] == len(layout.linears) - len(layout.linears) // 2
    assert artifact.kernels["GatherBlockQuantized"] == 1 and artifact.kernels["GroupQueryAttention"] == 3
    sess = _session(artifact.path)
    # the metadata the generation timing reads instead of parsing the file agrees with the graph
    assert sess.get_modelmeta().custom_metadata_map["slimtune.kv_cache"] == "shared-buffer"
    assert shares_kv_buffer(artifact.path, sess) is shares_kv_buffer(artifact.path) is True
    ids = np.random.default_rng(4).integers(0, VOCAB, (1, 9)).astype(np.int64)
    logits = sess.run(["logits"], with_empty_past(sess.get_inputs(), {"input_ids": ids,
                                                                       "attention_mask": np.ones_like(ids)}))[0]
    expected = _torch_logits(model, ids)
    cosine = np.sum(logits * expected, -1) / (np.linalg.norm(logits, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert cosine.min() > 0.95


def test_geometry_and_refusals():
    llama = tiny_llama(VOCAB)
    geometry = decoder_geometry(llama)
    assert (geometry.head_dim, geometry.query_heads, geometry.kv_heads, geometry.rotary_dim) == (16, 4, 2, 16)
    assert geometry.sliding_windows == (None, None, None)
    assert decoder_geometry(_tiny("mistral")).sliding_windows == (5, 5, 5)
    assert fusion_refusal(llama) is None and exporter_for(llama, LM) == "fused-decoder"
    assert exporter_for(llama, OutputSpec("embedding")) == "traced"
    llama.config.hidden_act = "gelu"
    assert "activation" in fusion_refusal(llama) and exporter_for(llama, LM) == "traced-decoder"


@pytest.mark.parametrize("method", ["fp32", "rtn", "grid"])
def test_query_key_value_pack_into_one_product_with_the_same_outputs(model, tmp_path, method):
    """fp32, 4-bit and grid-encoded (a model snapped onto a Q4_1 grid) projections, biases included."""
    import copy

    from slimtune.export.pack import pack_attention_projections
    from slimtune.export.quantize import quantize_blockwise_matmuls
    from slimtune.export.verify import weight_nodes
    from tests.transforms.test_contract_grid import _snap_to_grid

    source = _snap_to_grid(copy.deepcopy(model)) if method == "grid" else model
    proto = onnx.load(str(export_fused_decoder(source, tmp_path / "fused.onnx")))
    if method != "fp32":
        blocks = {n for n in weight_nodes(proto).matmuls if "lm_head" not in n}  # the snapped Linears
        proto = quantize_blockwise_matmuls(proto, blocks, 4, 32, method)
    onnx.save_model(proto, str(tmp_path / "unpacked.onnx"))
    packed = pack_attention_projections(proto)
    onnx.save_model(packed, str(tmp_path / "packed.onnx"))
    attention = [n for n in packed.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(list(n.input[1:3]) == ["", ""] for n in attention) and len(attention) == 3
    products = Counter(n.op_type for n in packed.graph.node)["MatMul" if method == "fp32" else "MatMulNBits"]
    assert products == 3 * 5 + (method == "fp32")  # qkv, o, gate, up, down per block (and the fp32 head)
    ids = np.random.default_rng(5).integers(0, VOCAB, (2, 9)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    before, after = (_session(tmp_path / f).run(["logits"], with_empty_past(_session(tmp_path / f).get_inputs(), feeds))[0]
                     for f in ("unpacked.onnx", "packed.onnx"))
    np.testing.assert_allclose(after, before, atol=1e-4)
    if method == "grid":  # and the grid still reproduces the snapped torch model
        np.testing.assert_allclose(after, _torch_logits(source, ids), atol=1e-3)
