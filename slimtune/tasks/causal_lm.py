"""Task kind ``causal-lm``: a language model judged by perplexity and by agreeing with its original.

The held-out documents are joined (a blank line between two) and tokenized once, then cut into
windows of ``model.max_length`` tokens whose starts are ``task.stride`` tokens apart (the
Hugging Face perplexity recipe): the first window scores every next token it predicts, each later
one only the targets past the previous window's end, so every token is scored once and, with a
stride under the context length, with at least ``context - stride`` tokens of context. Training
documents become non-overlapping windows for activation statistics and distillation recovery.

Figures on the held-out windows:

* ``perplexity``: exp of the mean negative log-likelihood of the scored next tokens (lower is better);
* ``next_token_agreement``: the fraction of scored positions where the candidate's most likely
  next token is the uncompressed model's (greedy decoding follows the same path while it agrees).

A window's logits are (positions x vocabulary): 25 MB per 128-token window for a 49k vocabulary.
They are reduced right after each run (``reduced_run``) to two numbers per position, the
log-probability of the true next token and the top token's id, so no more than a few windows'
logits are held at once.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from slimtune.config import TaskConfig
from slimtune.model import LoadedModel, OutputSpec, wrap_output
from slimtune.tasks.base import CALIBRATION_TEXTS, Metric, PreparedTask, Progress, Run, run_batches, torch_run
from slimtune.tasks.data import DataError, TextData, limit_rows, split_indices

WINDOWS_PER_RUN = 4  # windows whose full logits are held at once (memory: 4 x 25 MB at a 49k vocabulary)
NOT_SCORED = -1


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """The documents joined by a blank line, tokenized once without special tokens (int64)."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def windows(stream: np.ndarray, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, targets), both (windows, context): windows starting every ``stride`` tokens;
    ``targets[w, t]`` is the token after position t where that prediction is scored, else -1.

    Only predictions of tokens inside the window are scored (the last position's is not). The
    first window scores all of them, a later one only the tokens past the previous window's last
    scored one; with ``stride == context`` a window's first token is context only. A tail shorter
    than ``context`` is left out.
    """
    starts = list(range(0, len(stream) - context + 1, stride))
    ids = np.stack([stream[s:s + context] for s in starts]) if starts else np.zeros((0, context), np.int64)
    targets = np.full(ids.shape, NOT_SCORED, dtype=np.int64)
    for row, start in enumerate(starts):
        following = stream[start + 1:start + context]
        first_new = 0 if row == 0 else max(0, context - stride - 1)
        targets[row, first_new:context - 1] = following[first_new:]
    return ids, targets


def reduce_logits(input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """(batch, positions, vocab) logits -> (batch, positions, 2) float32: [..., 0] the log-probability of
    the next input token (0 at the last position, which has none in the window), [..., 1] the top token id."""
    logits = np.asarray(logits, dtype=np.float32)
    top = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    out = np.zeros((*logits.shape[:2], 2), dtype=np.float32)
    following = input_ids[:, 1:]
    picked = np.take_along_axis(logits[:, :-1], following[..., None], axis=-1)[..., 0]
    out[:, :-1, 0] = picked - log_norm[:, :-1]
    out[..., 1] = logits.argmax(axis=-1)
    return out


def reduced_run(run: Run) -> Run:
    """``run`` (feeds -> logits) as feeds -> ``reduce_logits``, a few windows at a time."""

    def reduced(feeds: dict[str, np.ndarray]) -> np.ndarray:
        parts = []
        for start in range(0, len(feeds["input_ids"]), WINDOWS_PER_RUN):
            chunk = {name: value[start:start + WINDOWS_PER_RUN] for name, value in feeds.items()}
            parts.append(reduce_logits(chunk["input_ids"], run(chunk)))
        return np.concatenate(parts)

    return reduced


def prepare(loaded: LoadedModel, output: OutputSpec, max_length: int, cfg: TaskConfig, data: TextData,
            metric: str, reason: str, progress: Progress | None = None) -> PreparedTask:
    if len(data.texts) < 2:
        raise DataError(f"{data.origin} holds {len(data.texts)} document; causal-lm splits documents into "
                        "training and held-out text: give at least two (one per line in a .txt file)")
    stride = cfg.stride or max_length
    if stride > max_length:
        raise DataError(f"task.stride {stride} is longer than the context (model.max_length {max_length}): "
                        "tokens between windows would never be scored; use a stride up to the context length")
    # split by document; task.eval_limit and task.train_limit count windows, cut below
    train, test = split_indices(len(data.texts), cfg.test_fraction, cfg.seed)
    train_ids, _ = windows(token_stream(loaded.tokenizer, [data.texts[i] for i in train]), max_length, max_length)
    test_ids, targets = windows(token_stream(loaded.tokenizer, [data.texts[i] for i in test]), max_length, stride)
    if len(test_ids) == 0 or len(train_ids) == 0:
        raise DataError(f"{data.origin} leaves fewer than {max_length} tokens of training or held-out text: give "
                        "more text or lower model.max_length")
    if cfg.eval_limit is not None:  # windows
        rows = limit_rows(np.arange(len(test_ids)), cfg.eval_limit, cfg.seed)
        test_ids, targets = test_ids[rows], targets[rows]
    if cfg.train_limit is not None:
        train_ids = train_ids[limit_rows(np.arange(len(train_ids)), cfg.train_limit, cfg.seed)]
    mask = np.ones_like(test_ids)
    outputs = run_batches(reduced_run(torch_run(wrap_output(loaded.module, output).eval())), test_ids, mask,
                          batch_size=WINDOWS_PER_RUN, progress=progress)
    calibration = np.sort(np.random.default_rng(cfg.seed).permutation(len(train_ids))[:CALIBRATION_TEXTS])
    task = PreparedTask(
        kind="causal-lm", metric=metric, metric_reason=reason, output=output,
        input_ids=test_ids, attention_mask=mask,
        calibration_ids=train_ids[calibration], calibration_mask=np.ones_like(train_ids[calibration]),
        train_ids=train_ids, train_mask=np.ones_like(train_ids),
        # No stored teacher outputs: a window's logits are tens of MB; recovery runs the teacher per step.
        train_targets=None,
        labels=targets, reference_outputs=outputs[..., 1].copy(), uncompressed_outputs=outputs,
    )
    return _with_reference(task, outputs)


def _with_reference(task: PreparedTask, outputs: np.ndarray) -> PreparedTask:
    return dataclasses.replace(task, reference={m.name: m.value for m in score(task, outputs)})


def score(task: PreparedTask, outputs: np.ndarray) -> tuple[Metric, ...]:
    """Perplexity and next-token agreement from ``reduce_logits`` outputs of the held-out windows."""
    scored = task.labels >= 0
    tokens = int(scored.sum())
    nll = -float(np.mean(outputs[..., 0][scored], dtype=np.float64))
    agreement = float(np.mean(outputs[..., 1][scored] == task.reference_outputs[scored]))
    return (
        Metric("perplexity", float(np.exp(nll)), "perplexity",
               f"exp of the mean next-token negative log-likelihood over {tokens} held-out tokens "
               f"({len(task.input_ids)} windows of {task.input_ids.shape[1]})"),
        Metric("next_token_agreement", agreement, "fraction",
               f"share of {tokens} held-out positions where the top next token is the uncompressed model's"),
    )
