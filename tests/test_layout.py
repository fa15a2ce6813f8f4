from __future__ import annotations

import pytest
import torch
from transformers import DistilBertConfig, DistilBertModel, LlamaConfig, LlamaModel

from slimtune.layout import LayoutError, discover_layout


def test_bert_blocks_roles_and_embedding(bert):
    layout = discover_layout(bert)
    assert [b.name for b in layout.blocks] == ["encoder.layer.0", "encoder.layer.1"]
    block = layout.blocks[0]
    assert block.ffn_up == ("encoder.layer.0.intermediate.dense",)
    assert block.ffn_down == ("encoder.layer.0.output.dense",)
    assert len(block.attention) == 4
    assert layout.embedding == "embeddings.word_embeddings"
    assert layout.shape("encoder.layer.0.intermediate.dense") == (64, 256)


def test_other_architectures_are_found_from_their_modules():
    distil = DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=3, n_heads=2, hidden_dim=64))
    layout = discover_layout(distil)
    assert [b.name for b in layout.blocks] == [f"transformer.layer.{i}" for i in range(3)]
    assert layout.blocks[0].ffn_up == ("transformer.layer.0.ffn.lin1",)
    torch.manual_seed(0)
    llama = LlamaModel(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2))
    block = discover_layout(llama).blocks[1]
    assert set(block.ffn_up) == {"layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"}
    assert block.ffn_down == ("layers.1.mlp.down_proj",)
    assert {n.rsplit(".", 1)[1] for n in block.attention} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_a_model_without_blocks_is_refused():
    with pytest.raises(LayoutError, match="transformer"):
        discover_layout(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_a_gpt2_style_model_is_refused_naming_its_conv1d_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, eos_token_id=0,
                                       bos_token_id=0))
    with pytest.raises(LayoutError, match="Conv1D"):
        discover_layout(model)
