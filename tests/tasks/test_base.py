from __future__ import annotations

import numpy as np
import pytest

from slimtune.tasks.base import TOKENS_PER_RUN, run_batches, texts_per_run


@pytest.mark.parametrize("length", [8, 128, 512, 2048])
def test_a_scoring_run_takes_about_its_token_budget_and_at_least_one_text(length):
    seen: list[tuple[int, int]] = []

    def run(feeds):
        seen.append(feeds["input_ids"].shape)
        return feeds["input_ids"][:, :1].astype(np.float32)

    ids = np.arange(37 * length, dtype=np.int64).reshape(37, length)
    outputs = run_batches(run, ids, np.ones_like(ids))
    assert outputs[:, 0].tolist() == ids[:, 0].tolist()  # every text once, in order
    assert all(rows * width <= max(TOKENS_PER_RUN, width) for rows, width in seen)
    assert seen[0][0] == min(37, texts_per_run(length)) == min(37, max(1, TOKENS_PER_RUN // length))


def test_a_caller_may_name_its_batch():
    seen: list[int] = []
    ids = np.zeros((10, 4), np.int64)
    run_batches(lambda feeds: seen.append(len(feeds["input_ids"])) or np.zeros((len(feeds["input_ids"]), 1)),
                ids, ids, batch_size=3)
    assert seen == [3, 3, 3, 1]


def test_non_finite_outputs_raise():
    ids = np.zeros((2, 4), np.int64)
    with pytest.raises(FloatingPointError):
        run_batches(lambda feeds: np.full((len(feeds["input_ids"]), 1), np.nan), ids, ids)
