"""Exactness of the structural transforms where the maths says they must be exact."""

from __future__ import annotations

import numpy as np
import torch

from slimtune.model import PooledEmbedding
from slimtune.plan import CompressionPlan
from slimtune.transforms import apply_structural
from slimtune.transforms.lowrank import LowRankLinear


def _pooled(model, ids):
    return PooledEmbedding(model)(ids, torch.ones_like(ids)).detach()


def test_pruning_dead_neurons_changes_nothing(bert):
    up = bert.encoder.layer[0].intermediate.dense
    down = bert.encoder.layer[0].output.dense
    with torch.no_grad():  # a quarter of the neurons neither read nor write anything
        down.weight[:, :64] = 0.0
    ids = torch.randint(1, 1000, (2, 12))
    pruned = apply_structural(bert, CompressionPlan(ffn_prune={"encoder.layer.0": 0.25}))
    new_up = pruned.encoder.layer[0].intermediate.dense
    assert (new_up.out_features, pruned.encoder.layer[0].output.dense.in_features) == (192, 192)
    assert up.out_features == 256  # the input model is untouched
    torch.testing.assert_close(_pooled(pruned, ids), _pooled(bert, ids), atol=1e-5, rtol=1e-4)


def test_low_rank_is_exact_on_a_low_rank_matrix(bert):
    linear = bert.encoder.layer[1].intermediate.dense
    with torch.no_grad():
        linear.weight.copy_(torch.randn(256, 8) @ torch.randn(8, 64) / 8)
    ids = torch.randint(1, 1000, (2, 12))
    factored = apply_structural(bert, CompressionPlan(low_rank={"encoder.layer.1.intermediate.dense": 0.25}))
    module = factored.encoder.layer[1].intermediate.dense
    assert isinstance(module, LowRankLinear) and module.first.out_features == 16
    torch.testing.assert_close(_pooled(factored, ids), _pooled(bert, ids), atol=1e-4, rtol=1e-3)


def test_low_rank_skipped_where_it_would_not_save(bert):
    plan = CompressionPlan(low_rank={"encoder.layer.0.attention.self.query": 0.5})
    assert isinstance(apply_structural(bert, plan).encoder.layer[0].attention.self.query, torch.nn.Linear)


def test_pruning_then_factorising_composes(bert):
    plan = CompressionPlan(ffn_prune={"encoder.layer.0": 0.5}, low_rank={"encoder.layer.0.output.dense": 0.5})
    model = apply_structural(bert, plan)
    down = model.encoder.layer[0].output.dense
    assert isinstance(down, LowRankLinear) and down.in_features == 128 and down.first.out_features == 32


def test_calibration_ignores_padding_and_covers_every_ffn(bert):
    from slimtune.transforms import collect_calibration

    ids = np.random.default_rng(0).integers(1, 1000, (3, 10)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[:, 7:] = 0
    other = ids.copy()
    other[:, 7:] = 5  # different tokens under padding only
    first, second = collect_calibration(bert, ids, mask), collect_calibration(bert, other, mask)
    assert set(first.ffn_activation) == {"encoder.layer.0", "encoder.layer.1"}
    assert first.ffn_activation["encoder.layer.0"].shape == (256,)
    np.testing.assert_allclose(first.ffn_activation["encoder.layer.0"], second.ffn_activation["encoder.layer.0"],
                               rtol=1e-6)


def test_activation_aware_pruning_removes_silent_neurons_first(bert):
    from slimtune.transforms import collect_calibration

    up = bert.encoder.layer[0].intermediate.dense
    down = bert.encoder.layer[0].output.dense
    with torch.no_grad():  # 64 neurons never fire (GELU(-20) ~ 0) but have the largest weights
        up.weight[:64] *= 5.0
        up.bias[:64] = -20.0
        down.weight[:, :64] *= 50.0
    ids = np.random.default_rng(1).integers(1, 1000, (4, 12)).astype(np.int64)
    calibration = collect_calibration(bert, ids, np.ones_like(ids))
    plan = CompressionPlan(ffn_prune={"encoder.layer.0": 0.25})
    aware = apply_structural(bert, plan, calibration)
    weights_only = apply_structural(bert, plan)
    test_ids = torch.randint(1, 1000, (2, 12))
    torch.testing.assert_close(_pooled(aware, test_ids), _pooled(bert, test_ids), atol=1e-4, rtol=1e-3)
    assert not torch.allclose(_pooled(weights_only, test_ids), _pooled(bert, test_ids), atol=1e-3)
