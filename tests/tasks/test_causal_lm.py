"""The causal-lm task kind: windows, per-token reduction, perplexity and agreement, detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimtune.config import BUILTIN_TEXT, ModelConfig, TaskConfig
from slimtune.model import load_model
from slimtune.tasks import DataError, choose_task, default_data, load_texts, prepare_task, score_task
from slimtune.tasks.base import torch_run
from slimtune.tasks.causal_lm import NOT_SCORED, reduce_logits, windows
from slimtune.tasks.data import TextData


def test_windows_score_every_token_once_with_overlapping_context():
    stream = np.arange(100, 120)
    ids, targets = windows(stream, context=8, stride=4)
    assert ids.tolist()[1] == list(range(104, 112))
    scored = [int(t) for row in targets for t in row if t != NOT_SCORED]
    assert scored == list(range(101, 120))  # every token after the first, each once
    assert (targets[:, -1] == NOT_SCORED).all()  # the last position's next token is outside its window


def test_windows_without_overlap_score_all_but_each_window_start():
    ids, targets = windows(np.arange(16), context=8, stride=8)
    assert ids.shape == (2, 8)
    assert [int(t) for t in targets[1] if t != NOT_SCORED] == list(range(9, 16))


def test_reduction_is_the_log_probability_of_the_next_token_and_the_top_token():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (2, 5))
    reduced = reduce_logits(ids, logits)
    expected = torch.log_softmax(torch.from_numpy(logits), -1)[:, :-1].gather(-1, torch.from_numpy(ids[:, 1:, None]))
    np.testing.assert_allclose(reduced[:, :-1, 0], expected[..., 0].numpy(), atol=1e-5)
    assert (reduced[..., 1] == logits.argmax(-1)).all()


@pytest.fixture(scope="module")
def lm_task(tiny_llama_dir, tmp_path_factory):
    model_cfg = ModelConfig(name=str(tiny_llama_dir), max_length=32)
    task_cfg = TaskConfig(eval_limit=12)
    data = load_texts(task_cfg, default_data(task_cfg, str(tiny_llama_dir)))
    choice = choose_task(model_cfg, task_cfg, str(tiny_llama_dir), data)
    loaded = load_model(str(tiny_llama_dir), causal_lm=True)
    task, _ = prepare_task(model_cfg, task_cfg, choice, loaded, data, tmp_path_factory.mktemp("cache"))
    return loaded, choice, data, task


def test_a_causal_lm_is_detected_and_reads_python_docs_by_default(lm_task):
    _, choice, data, task = lm_task
    assert choice.kind == "causal-lm" and choice.output.kind == "lm"
    assert data.origin == BUILTIN_TEXT and len(data.texts) > 50
    assert task.metric == "perplexity" and task.input_ids.shape == (12, 32)
    assert task.reference["next_token_agreement"] == 1.0


def test_train_limit_keeps_that_many_training_windows(lm_task, tiny_llama_dir, tmp_path):
    loaded, choice, data, task = lm_task
    limited, _ = prepare_task(ModelConfig(name=str(tiny_llama_dir), max_length=32), TaskConfig(eval_limit=12, train_limit=50),
                              choice, loaded, data, tmp_path)
    assert len(task.train_ids) > 50 and limited.train_ids.shape == (50, 32)
    assert {row.tobytes() for row in limited.train_ids} <= {row.tobytes() for row in task.train_ids}
    assert limited.calibration_ids.shape[0] <= 50 and limited.reference == task.reference  # held-out part as it was


def test_perplexity_is_exp_of_the_mean_cross_entropy_of_the_scored_tokens(lm_task):
    loaded, _, _, task = lm_task
    with torch.no_grad():
        logits = loaded.module(input_ids=torch.from_numpy(task.input_ids)).logits
    targets = torch.from_numpy(task.labels)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none")
    expected = float(torch.exp(loss[targets.flatten() >= 0].mean()))
    assert task.reference["perplexity"] == pytest.approx(expected, rel=1e-4)
    # An untrained model is close to uniform over the vocabulary.
    assert 0.3 * loaded.tokenizer.vocab_size < expected < 3 * loaded.tokenizer.vocab_size


def test_a_different_model_agrees_less_and_scores_differently(lm_task, tmp_path):
    from tests.conftest import tiny_llama

    loaded, _, _, task = lm_task
    other = tiny_llama(loaded.tokenizer.vocab_size, seed=7)
    from slimtune.model import NextTokenLogits

    metrics = {m.name: m.value for m in score_task(task, torch_run(NextTokenLogits(other)))}
    assert metrics["next_token_agreement"] < 0.95
    assert metrics["perplexity"] != pytest.approx(task.reference["perplexity"], rel=1e-3)


def test_too_little_text_and_a_stride_past_the_context_are_clear_errors(lm_task, tiny_llama_dir, tmp_path):
    loaded, choice, _, _ = lm_task
    model_cfg = ModelConfig(name=str(tiny_llama_dir), max_length=32)
    with pytest.raises(DataError, match="at least two"):
        prepare_task(model_cfg, TaskConfig(), choice, loaded, TextData(("one document",), None, "x.txt"), tmp_path)
    data = TextData(("a b c " * 50, "d e f " * 50), None, "x.txt")
    with pytest.raises(DataError, match="stride"):
        prepare_task(model_cfg, TaskConfig(stride=64), choice, loaded, data, tmp_path)
    with pytest.raises(DataError, match="fewer than 32 tokens"):
        prepare_task(model_cfg, TaskConfig(), choice, loaded, TextData(("a b", "c d"), None, "x.txt"), tmp_path)


def test_kind_causal_lm_on_an_encoder_names_the_problem(tiny_model_dir):
    from slimtune.model import ModelLoadError

    data = TextData(("a", "b"), None, "x.txt")
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        choose_task(ModelConfig(name=str(tiny_model_dir)), TaskConfig(kind="causal-lm"), str(tiny_model_dir), data)
