"""Attention-head pruning: the contract on three architectures, exactness, sizes, GQA groups, ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXModel

from slimtune.layout import discover_layout
from slimtune.model import PooledEmbedding
from slimtune.plan import CompressionPlan, PlanError, pruned_width
from slimtune.transforms import apply_structural, collect_calibration
from slimtune.transforms.heads import attention_roles, head_groups

# Fp32 MatMul counts of the tiny models: head pruning shrinks MatMuls, it adds or removes none.
MATMULS = {"bert": 16, "distilbert": 16, "llama": 18}
# Random tiny models are fragile: half the heads of one block moves a random Llama far (its
# attention output is as large as the residual stream); trained models are measured in the report.
MIN_COSINE = {"bert": 0.99, "distilbert": 0.99, "llama": 0.5}


def _roles(model, index: int = 0):
    layout = discover_layout(model)
    return attention_roles(model, layout.blocks[index], layout.hidden_size)


def _pooled(model, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    return PooledEmbedding(model)(torch.from_numpy(ids), torch.from_numpy(mask)).detach()


def _silence(model, roles, group: int) -> None:
    """Zero the output-projection columns of one head group: it then contributes nothing."""
    with torch.no_grad():
        model.get_submodule(roles.output).weight[:, roles.query_slice(group)] = 0.0


def test_head_pruning_contract(arch, tiny_model, contract, calibrate, tmp_path):
    model = tiny_model(arch)
    block = discover_layout(model).blocks[0].name
    plan = CompressionPlan(head_prune={block: 0.5})
    contract(model, plan, tmp_path, MIN_COSINE[arch], {"MatMul": MATMULS[arch]}, calibrate(model))


@pytest.mark.parametrize("aware", [True, False])
def test_a_silent_head_is_the_one_removed_and_nothing_changes(arch, aware, tiny_model, calibrate, token_batch):
    model = tiny_model(arch)
    roles = _roles(model)
    _silence(model, roles, group=1)
    fraction = 1 / roles.groups  # exactly one group
    plan = CompressionPlan(head_prune={discover_layout(model).blocks[0].name: fraction})
    pruned = apply_structural(model, plan, calibrate(model) if aware else None)

    kept = [g for g in range(roles.groups) if g != 1]
    original_q = model.get_submodule(roles.query).weight
    expected_q = torch.cat([original_q[roles.query_slice(g)] for g in kept])
    torch.testing.assert_close(pruned.get_submodule(roles.query).weight, expected_q, rtol=0, atol=0)
    ids, mask = token_batch
    before, after = _pooled(model, ids, mask), _pooled(pruned, ids, mask)
    assert torch.nn.functional.cosine_similarity(before, after).min() > 0.99999
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_parameter_counts_shrink_as_predicted(arch, tiny_model):
    model = tiny_model(arch)
    layout = discover_layout(model)
    fractions = {layout.blocks[0].name: 0.5, layout.blocks[1].name: 0.25}
    pruned = apply_structural(model, CompressionPlan(head_prune=fractions))

    removed = 0
    for index, (block, fraction) in enumerate(fractions.items()):
        roles = _roles(model, index)
        gone = roles.groups - pruned_width(roles.groups, fraction)
        per_group = 0
        for name, rows in ((roles.query, roles.ratio), (roles.key, 1), (roles.value, 1)):
            linear = model.get_submodule(name)
            per_group += rows * roles.head_dim * (linear.in_features + (linear.bias is not None))
        per_group += roles.ratio * roles.head_dim * layout.hidden_size  # output-projection columns
        removed += gone * per_group
        assert head_groups(pruned)[block] == roles.groups - gone
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert removed > 0 and count(model) - count(pruned) == removed


def test_grouped_query_attention_keeps_whole_groups(tiny_model, calibrate, token_batch):
    model = tiny_model("llama")  # 4 query heads sharing 2 key/value heads
    roles = _roles(model)
    assert (roles.groups, roles.ratio) == (2, 2)
    _silence(model, roles, group=0)  # query heads 0 and 1, which read kv head 0
    pruned = apply_structural(model, CompressionPlan(head_prune={"layers.0": 0.5}), calibrate(model))

    new = _roles(pruned)
    assert (new.groups, new.ratio) == (1, 2)
    for name, rows in ((roles.query, roles.query_slice(1)), (roles.key, roles.kv_slice(1)),
                       (roles.value, roles.kv_slice(1))):
        torch.testing.assert_close(pruned.get_submodule(name).weight, model.get_submodule(name).weight[rows])
    torch.testing.assert_close(pruned.get_submodule(roles.output).weight,
                               model.get_submodule(roles.output).weight[:, roles.query_slice(1)])
    ids, mask = token_batch
    torch.testing.assert_close(_pooled(pruned, ids, mask), _pooled(model, ids, mask), atol=1e-5, rtol=1e-4)


def test_importance_is_the_mean_size_of_each_heads_contribution(bert, calibrate, token_batch):
    ids, mask = token_batch
    before = calibrate(bert).head_importance["encoder.layer.0"]
    roles = _roles(bert)
    with torch.no_grad():  # head 2 writes 10x larger; block 0's inputs are unchanged
        bert.get_submodule(roles.output).weight[:, roles.query_slice(2)] *= 10.0
    after = calibrate(bert).head_importance["encoder.layer.0"]
    assert after.dtype == np.float64 and after.shape == (4,)
    np.testing.assert_allclose(after, before * np.array([1, 1, 10, 1]), rtol=1e-6)

    padded = ids.copy()
    padded[mask == 0] = 7  # other tokens under padding only
    other = collect_calibration(bert, padded, mask).head_importance["encoder.layer.0"]
    np.testing.assert_allclose(other, after, rtol=1e-6)


def test_activation_ranking_prefers_heads_with_larger_contributions(bert, calibrate, token_batch):
    roles = _roles(bert)
    with torch.no_grad():  # head 1's value weights are zero but its bias makes it write a large constant
        value = bert.get_submodule(roles.value)
        value.weight[roles.kv_slice(1)] = 0.0
        value.bias[roles.kv_slice(1)] = 3.0
    calibration = calibrate(bert)
    assert int(np.argmax(calibration.head_importance["encoder.layer.0"])) == 1

    plan = CompressionPlan(head_prune={"encoder.layer.0": 0.25})
    aware, weights_only = apply_structural(bert, plan, calibration), apply_structural(bert, plan)
    value_rows = bert.get_submodule(roles.value).weight[roles.kv_slice(1)]
    kept = lambda m: any(torch.equal(value_rows, m.get_submodule(roles.value).weight[rows])  # noqa: E731
                         for rows in (roles.kv_slice(g) for g in range(3)))
    assert kept(aware) and not kept(weights_only)  # weights alone see a zero head and remove it
    ids, mask = token_batch
    reference = _pooled(bert, ids, mask)
    error = lambda m: float((_pooled(m, ids, mask) - reference).norm())  # noqa: E731
    assert error(aware) < error(weights_only)


def test_fused_attention_is_refused_with_a_clear_error():
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=256)
    model = GPTNeoXModel(config).eval()  # one query_key_value Linear per block
    assert head_groups(model) == {}
    with pytest.raises(PlanError, match="fused qkv"):
        apply_structural(model, CompressionPlan(head_prune={"layers.0": 0.5}))
    assert "layers.0" not in collect_calibration(model, np.ones((1, 4), np.int64),
                                                 np.ones((1, 4), np.int64)).head_importance


def test_head_groups_and_unknown_blocks(tiny_model):
    assert head_groups(tiny_model("bert")) == {"encoder.layer.0": 4, "encoder.layer.1": 4}
    assert head_groups(tiny_model("llama")) == {"layers.0": 2, "layers.1": 2}
    with pytest.raises(PlanError, match="not a transformer block"):
        apply_structural(tiny_model("bert"), CompressionPlan(head_prune={"encoder.layer.9": 0.5}))
