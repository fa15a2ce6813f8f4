"""Activation-aware low-rank (ASVD): the contract on three architectures, and where it beats plain SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimtune.layout import discover_layout
from slimtune.plan import CompressionPlan, PlanError
from slimtune.transforms import Calibration, apply_structural
from slimtune.transforms.lowrank import LowRankLinear, input_magnitudes

# Fp32 MatMul counts of the tiny models, plus one per factorised FFN Linear (two factors each).
MATMULS = {"bert": 16, "distilbert": 16, "llama": 18}


def test_asvd_contract(arch, tiny_model, contract, calibrate, tmp_path):
    model = tiny_model(arch)
    ffn = discover_layout(model).blocks[0].ffn
    plan = CompressionPlan(low_rank={name: 0.5 for name in ffn}, low_rank_method="asvd")
    contract(model, plan, tmp_path, 0.9, {"MatMul": MATMULS[arch] + len(ffn)}, calibrate(model))


class ScaledChannels(nn.Module):
    """Token embedding whose 64 channels span three decades of scale, read by one Linear.

    Transformer activations look like this: a few channels many times larger than the rest.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(200, 64)
        self.linear = nn.Linear(64, 64)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(200, 64, generator=generator) * torch.logspace(-2, 1, 64))
            self.linear.weight.copy_(torch.randn(64, 64, generator=generator) / 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(self.embed(input_ids))


def _texts(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, 200, (8, 32)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::2, 20:] = 0
    return ids, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_asvd_beats_svd_when_input_channels_differ_in_scale(seed):
    model = ScaledChannels(seed).eval()
    ids, mask = _texts(seed)
    calibration = Calibration(input_ids=ids, attention_mask=mask)
    errors = {}
    for method in ("svd", "asvd"):
        factored = apply_structural(model, CompressionPlan(low_rank={"linear": 0.25}, low_rank_method=method),
                                    calibration)
        assert isinstance(factored.linear, LowRankLinear) and factored.linear.first.out_features == 16
        with torch.no_grad():
            x = model.embed(torch.from_numpy(ids))[torch.from_numpy(mask) == 1]  # calibration activations
            reference = model.linear(x)
            errors[method] = float((factored.linear(x) - reference).norm() / reference.norm())
    assert errors["asvd"] < 0.5 * errors["svd"], errors


def test_asvd_is_exact_on_a_low_rank_matrix():
    model = ScaledChannels().eval()
    with torch.no_grad():
        model.linear.weight.copy_(torch.randn(64, 8) @ torch.randn(8, 64) / 8)
    ids, mask = _texts()
    factored = apply_structural(model, CompressionPlan(low_rank={"linear": 0.25}, low_rank_method="asvd"),
                                Calibration(input_ids=ids, attention_mask=mask))
    x = model.embed(torch.from_numpy(ids))
    torch.testing.assert_close(factored.linear(x), model.linear(x), atol=1e-4, rtol=1e-4)


def test_magnitudes_ignore_padding_and_follow_the_model_as_it_is():
    model = ScaledChannels().eval()
    ids, mask = _texts()
    other = ids.copy()
    other[mask == 0] = 3  # different tokens under padding only
    first = input_magnitudes(model, ["linear"], Calibration(input_ids=ids, attention_mask=mask))["linear"]
    second = input_magnitudes(model, ["linear"], Calibration(input_ids=other, attention_mask=mask))["linear"]
    torch.testing.assert_close(first, second)
    expected = model.embed(torch.from_numpy(ids))[torch.from_numpy(mask) == 1].abs().mean(0).double()
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-8)


def test_asvd_after_pruning_measures_the_pruned_layer(bert, calibrate):
    plan = CompressionPlan(ffn_prune={"encoder.layer.0": 0.5}, low_rank={"encoder.layer.0.output.dense": 0.5},
                           low_rank_method="asvd")
    down = apply_structural(bert, plan, calibrate(bert)).encoder.layer[0].output.dense
    assert isinstance(down, LowRankLinear) and down.in_features == 128 and down.first.out_features == 32


def test_asvd_without_calibration_texts_names_the_fix(bert):
    plan = CompressionPlan(low_rank={"encoder.layer.0.intermediate.dense": 0.5}, low_rank_method="asvd")
    for calibration in (None, Calibration()):
        with pytest.raises(PlanError, match="collect_calibration"):
            apply_structural(bert, plan, calibration)


def test_plain_svd_factors_are_remembered_and_the_same(bert):
    """A search factorises the same (pruned) matrices at the same rank again: the second time comes
    from the per-process cache, with the very same bytes."""
    from slimtune.transforms import lowrank

    linear = bert.encoder.layer[0].intermediate.dense
    lowrank._factor_cache.clear()
    first = lowrank.factorise(linear, 16)
    assert len(lowrank._factor_cache) == 1
    again = lowrank.factorise(linear, 16)
    assert len(lowrank._factor_cache) == 1  # a hit, nothing added
    fresh = [f.to(linear.weight.dtype) for f in lowrank._factor_weights(linear.weight.detach(), 16, None)]
    for a, b, c in ((first.first.weight, again.first.weight, fresh[0]), (first.second.weight, again.second.weight, fresh[1])):
        assert torch.equal(a, b) and torch.equal(a, c)
    lowrank.factorise(linear, 8)  # another rank is another entry
    assert len(lowrank._factor_cache) == 2
    scales = torch.rand(linear.in_features, dtype=torch.float64) + 0.5
    lowrank.factorise(linear, 16, scales)  # ASVD's scales follow each plan's activations: not kept
    assert len(lowrank._factor_cache) == 2


class SharedLayer(nn.Module):
    """One Linear applied twice in a pass (as ALBERT shares its layers), then a second Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(200, 16)
        self.shared = nn.Linear(16, 16)
        self.last = nn.Linear(16, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.last(self.shared(self.shared(self.embed(input_ids))))


def test_magnitudes_skip_the_layers_after_the_deepest_and_stay_the_same(bert):
    ids = np.random.default_rng(0).integers(1, 1000, size=(48, 16)).astype(np.int64)
    calibration = Calibration(input_ids=ids, attention_mask=np.ones_like(ids))
    early = ["encoder.layer.0.intermediate.dense", "encoder.layer.0.attention.self.query"]
    after = bert.encoder.layer[1]
    passes = []
    hook = after.register_forward_hook(lambda *a: passes.append(1))
    try:
        stopped = input_magnitudes(bert, early, calibration, batch_size=16)
    finally:
        hook.remove()
    assert len(passes) == 1  # the first batch's whole pass counts the calls; the other two stop in layer 0
    assert not bert.training
    for name in early:  # the same sums as whole passes
        whole = {}
        handle = bert.get_submodule(name).register_forward_hook(
            lambda m, i, o, whole=whole: whole.__setitem__("x", whole.get("x", 0) + i[0].detach().abs().double().sum((0, 1))))
        with torch.no_grad():
            for start in range(0, 48, 16):
                bert(input_ids=torch.from_numpy(ids[start:start + 16]), attention_mask=torch.ones(16, 16, dtype=torch.long))
        handle.remove()
        torch.testing.assert_close(stopped[name], whole["x"] / (48 * 16), rtol=1e-12, atol=0)
    shared, small = SharedLayer().eval(), ids % 200
    both = input_magnitudes(shared, ["shared"], Calibration(input_ids=small, attention_mask=np.ones_like(small)),
                            batch_size=16)["shared"]
    emb = shared.embed(torch.from_numpy(small)).detach()
    expected = (emb.abs().sum((0, 1)).double() + shared.shared(emb).detach().abs().sum((0, 1)).double()) / (2 * 48 * 16)
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-8)  # both calls of the shared Linear, every batch
