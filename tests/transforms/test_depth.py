"""Depth pruning: whole blocks removed, surviving blocks keep their names, on three architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimtune.export import build_artifact
from slimtune.layout import discover_layout
from slimtune.plan import CompressionPlan, PlanError, QuantSpec
from slimtune.transforms import apply_structural

MATMULS_PER_BLOCK = {"bert": 8, "distilbert": 8, "llama": 9}  # weight Linears + the two attention products


def test_depth_contract(arch, tiny_model, contract, tmp_path):
    model = tiny_model(arch, layers=3)
    middle = discover_layout(model).blocks[1].name
    plan = CompressionPlan(depth_prune=(middle,))
    # A random tiny model is not robust to losing a third of its depth (0.49 on llama); what the
    # export does is pinned exactly by test_depth_pruned_model_equals_skipping_the_block.
    contract(model, plan, tmp_path, 0.3, {"MatMul": 2 * MATMULS_PER_BLOCK[arch]})


def test_dropped_block_keeps_the_other_names_and_quantizes_by_them(arch, tiny_model, tmp_path):
    model = tiny_model(arch, layers=3)
    blocks = discover_layout(model).blocks
    plan = CompressionPlan(depth_prune=(blocks[0].name,), quantize={n: QuantSpec("int8") for n in blocks[2].linears})
    pruned = apply_structural(model, plan)
    assert [b.name for b in discover_layout(pruned).blocks] == [blocks[1].name, blocks[2].name]
    artifact = build_artifact(model, plan, tmp_path / "d.onnx")
    assert artifact.kernels["MatMulInteger"] == len(blocks[2].linears)


def test_depth_pruned_model_equals_skipping_the_block(bert, tiny_model, token_batch):
    """Removing block 0 of 2 is exactly a one-block model holding block 1's weights."""
    ids, mask = (torch.from_numpy(a) for a in token_batch)
    pruned = apply_structural(bert, CompressionPlan(depth_prune=("encoder.layer.0",)))
    shorter = tiny_model("bert", layers=1)
    state = {k: v for k, v in bert.state_dict().items() if not k.startswith("encoder.layer.")}
    state |= {k.replace("encoder.layer.1.", "encoder.layer.0."): v for k, v in bert.state_dict().items()
              if k.startswith("encoder.layer.1.")}
    shorter.load_state_dict(state)
    got = pruned(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = shorter(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5)


def test_least_important_blocks_follow_the_measured_importance(bert, calibrate):
    calibration = calibrate(bert)
    ranked = sorted(calibration.block_importance, key=calibration.block_importance.get)
    assert calibration.least_important_blocks(1) == (ranked[0],)
    assert all(0.0 <= v <= 2.0 for v in calibration.block_importance.values())
    assert np.isfinite(list(calibration.block_importance.values())).all()


def test_depth_plan_errors(bert):
    with pytest.raises(PlanError, match="not a transformer block"):
        apply_structural(bert, CompressionPlan(depth_prune=("encoder.layer.7",)))
    with pytest.raises(PlanError, match="every transformer block"):
        apply_structural(bert, CompressionPlan(depth_prune=("encoder.layer.0", "encoder.layer.1")))


def test_entries_inside_dropped_blocks_leave_the_plan():
    plan = CompressionPlan(depth_prune=("b.1",), quantize={"b.1.q": QuantSpec("int8"), "b.10.q": QuantSpec("int8")},
                           ffn_prune={"b.1": 0.5})
    assert set(plan.quantize) == {"b.10.q"} and not plan.ffn_prune
