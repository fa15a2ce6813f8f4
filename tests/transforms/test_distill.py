"""Distillation recovery: it brings a pruned student back towards its teacher, seeded and step-budgeted."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from slimtune.export import build_artifact
from slimtune.model import PooledEmbedding
from slimtune.plan import CompressionPlan, PlanError, RecoverySpec
from slimtune.transforms import apply_structural
from slimtune.transforms.distill import recover


@pytest.fixture
def texts():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 1000, size=(48, 20)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::3, 14:] = 0
    return ids, mask


def _gap(model, teacher, ids, mask) -> float:
    """The distillation loss on the texts: MSE + mean (1 - cosine) of the pooled embeddings."""
    with torch.no_grad():
        a = PooledEmbedding(model)(torch.from_numpy(ids), torch.from_numpy(mask))
        b = PooledEmbedding(teacher)(torch.from_numpy(ids), torch.from_numpy(mask))
    return float(((a - b) ** 2).mean() + (1 - torch.nn.functional.cosine_similarity(a, b)).mean())


def test_recovery_narrows_the_gap_to_the_teacher(arch, tiny_model, calibrate, texts):
    teacher = tiny_model(arch, layers=3)
    calibration = dataclasses.replace(calibrate(teacher), training_ids=texts[0], training_mask=texts[1])
    plan = CompressionPlan(depth_prune=(f"{_blocks(teacher)}.1",), ffn_prune={f"{_blocks(teacher)}.0": 0.5},
                           recovery=RecoverySpec(steps=40, batch_size=8, learning_rate=1e-4))
    pruned = apply_structural(teacher, plan, calibration)
    before = _gap(pruned, teacher, *texts)
    recovered, steps = recover(teacher, apply_structural(teacher, plan, calibration), plan, calibration)
    assert steps == 40
    assert _gap(recovered, teacher, *texts) < 0.3 * before, before


def _blocks(model) -> str:
    from slimtune.layout import discover_layout

    return discover_layout(model).blocks[0].name.rpartition(".")[0]


def test_recovery_is_seeded_same_plan_same_bytes(bert, calibrate, texts, tmp_path):
    calibration = dataclasses.replace(calibrate(bert), training_ids=texts[0], training_mask=texts[1])
    plan = CompressionPlan(ffn_prune={"encoder.layer.0": 0.5}, recovery=RecoverySpec(steps=3, batch_size=4))
    first = build_artifact(bert, plan, tmp_path / "a.onnx", calibration)
    second = build_artifact(bert, plan, tmp_path / "b.onnx", calibration)
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.recover_s > 0
    other = build_artifact(bert, CompressionPlan(ffn_prune={"encoder.layer.0": 0.5}), tmp_path / "c.onnx", calibration)
    assert other.recover_s == 0 and other.path.read_bytes() != first.path.read_bytes()


def test_recovery_needs_training_texts(bert):
    plan = CompressionPlan(ffn_prune={"encoder.layer.0": 0.5}, recovery=RecoverySpec(steps=1))
    with pytest.raises(PlanError, match="training texts"):
        recover(bert, apply_structural(bert, plan), plan, None)


def test_recovery_is_dropped_from_plans_that_change_no_shapes():
    assert CompressionPlan(recovery=RecoverySpec(steps=5)).recovery is None
    plan = CompressionPlan(head_prune={"b.0": 0.5}, recovery=RecoverySpec(steps=5))
    assert CompressionPlan.loads(plan.dumps()) == plan


def test_known_targets_replace_the_teacher_pass_and_tables_stay_frozen(bert, calibrate, texts):
    """With the teacher's pooled embeddings given, training matches training against the live teacher."""
    from slimtune.transforms.distill import distill

    ids, mask = texts
    with torch.no_grad():
        targets = PooledEmbedding(bert)(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    plan = CompressionPlan(ffn_prune={"encoder.layer.0": 0.5})
    spec = RecoverySpec(steps=5, batch_size=8, learning_rate=1e-4)
    live, _ = distill(apply_structural(bert, plan), bert, ids, mask, spec)
    cached, _ = distill(apply_structural(bert, plan), bert, ids, mask, spec, targets=targets)
    for (name, a), b in zip(live.state_dict().items(), cached.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    assert torch.equal(live.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert not torch.equal(live.encoder.layer[1].output.dense.weight, bert.encoder.layer[1].output.dense.weight)


def test_a_classifier_recovers_its_teacher_logits(texts):
    """With logits as the output, distillation matches the teacher's class distributions (KL)."""
    from transformers import BertConfig, BertForSequenceClassification

    from slimtune.model import ClassifierLogits, OutputSpec
    from slimtune.transforms.distill import distill, logits_loss

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64, num_labels=3)).eval()
    with torch.no_grad():  # a random head's logits are near zero: sharpen them into real class preferences
        teacher.classifier.weight.mul_(300.0)
    ids, mask = (torch.from_numpy(a) for a in texts)

    def gap(model) -> float:
        with torch.no_grad():
            return float(logits_loss(ClassifierLogits(model)(ids, mask), ClassifierLogits(teacher)(ids, mask)))

    plan = CompressionPlan(ffn_prune={"bert.encoder.layer.0": 0.75, "bert.encoder.layer.1": 0.75})
    before = gap(apply_structural(teacher, plan))
    student, _ = distill(apply_structural(teacher, plan), teacher, *texts,
                      RecoverySpec(steps=30, batch_size=8, learning_rate=1e-4), output=OutputSpec("logits"))
    assert before > 0.005 and gap(student) < 0.5 * before, before


def test_a_flat_loss_ends_recovery_early_and_the_same_step_on_a_rebuild(arch, tiny_model, calibrate, texts):
    from slimtune.transforms.distill import FlatLoss, reporting_steps

    rule = FlatLoss(steps=100, patience=2)  # windows of 10 steps
    assert not any(rule.stop_after(1.0 / (i + 1)) for i in range(100))  # falling all the way: never stops
    flat = FlatLoss(steps=100, patience=2)
    assert [flat.stop_after(0.5) for _ in range(30)].index(True) == 29  # window 1 sets the best, 2 and 3 are flat
    assert not any(FlatLoss(steps=100, patience=0).stop_after(0.5) for _ in range(100))

    teacher = tiny_model(arch, layers=3)
    calibration = dataclasses.replace(calibrate(teacher), training_ids=texts[0], training_mask=texts[1])
    # a learning rate too small to move the loss: flat from the first window, over after the third
    plan = CompressionPlan(depth_prune=(f"{_blocks(teacher)}.1",),
                           recovery=RecoverySpec(steps=200, batch_size=8, learning_rate=1e-9, flat_patience=2))
    runs = []
    for _ in range(2):
        steps = []
        with reporting_steps(lambda done, total, loss, left, seen=steps: seen.append((done, total, loss, left))):
            student, _ = recover(teacher, apply_structural(teacher, plan, calibration), plan, calibration)
        runs.append((steps, [p.detach().clone() for p in student.parameters()]))
    (first, weights), (second, again) = runs
    assert len(first) == 60 and first[-1][1] == 200 and first[-1][3] > 0  # 3 windows of 20, not 200 steps
    assert [s[:3] for s in first] == [s[:3] for s in second]  # the same losses, the same last step
    assert all(torch.equal(a, b) for a, b in zip(weights, again, strict=True))


def test_a_time_budget_ends_recovery_and_its_steps_rebuild_the_same_model(arch, tiny_model, calibrate, texts):
    teacher = tiny_model(arch, layers=3)
    calibration = dataclasses.replace(calibrate(teacher), training_ids=texts[0], training_mask=texts[1])
    budgeted = CompressionPlan(depth_prune=(f"{_blocks(teacher)}.1",),
                               recovery=RecoverySpec(steps=100_000, batch_size=8, budget_s=1.0))
    student, steps = recover(teacher, apply_structural(teacher, budgeted, calibration), budgeted, calibration)
    assert 0 < steps < 100_000
    exact = dataclasses.replace(budgeted, recovery=dataclasses.replace(budgeted.recovery, steps=steps, budget_s=None))
    again, repeated = recover(teacher, apply_structural(teacher, exact, calibration), exact, calibration)
    assert repeated == steps
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), again.parameters(), strict=True))
    with pytest.raises(PlanError, match="budget_s"):
        RecoverySpec(steps=10, budget_s=0)
