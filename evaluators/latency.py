"""Latency of the exported file: one ONNX Runtime session, fixed threads, warm-up, timed runs.

Encoders: the median, the 90th percentile and the spread (p90 - p10, relative to the median) in
milliseconds per batch. Causal LMs (a graph with a KV cache): generation as a user feels it, at
batch 1: a prompt of ``sequence_length`` real tokens gives the time to first token (``ttft_ms``,
the prefill), then ``new_tokens`` greedy steps, each feeding the last token and the cache back,
give the time per generated token (``latency_ms``, the searched latency, with its p90 and
spread over every timed step) and ``tokens_per_s``. The timed section runs under the
machine-wide exclusive lock, so no other trial's work shares the cores while it is measured.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from slimtune.config import LatencyConfig
from slimtune.evaluators import Metric
from slimtune.evaluators.machine_load import contention, is_busy, median_contention, take_sample
from slimtune.evaluators.node_lock import NodeLock
from slimtune.evaluators.quality import session
from slimtune.export.decoder import KV_CACHE_KEY, is_decoder

BUSY_PAUSE_S = 2.0
"""Seconds to wait before timing again after a busy attempt: long enough for a short burst to pass."""
MEDIAN_CONFIDENCE = 0.95


@functools.lru_cache(maxsize=256)
def median_interval_ranks(runs: int, confidence: float = MEDIAN_CONFIDENCE) -> tuple[int, int] | None:
    """The 0-based order statistics (lo, hi) of ``runs`` sorted times that bound their median with
    at least ``confidence``, whatever the times' distribution (each time falls below the true median
    with probability 1/2, so the count below it is Binomial(runs, 1/2)); None when no interval of
    ``runs`` times reaches it (5 or fewer at 95%)."""
    below = 0.0
    rank = 0
    for k in range(runs // 2 + 1):  # P(X <= k) summed while it stays within the lower tail
        below += math.comb(runs, k) / 2 ** runs
        if below > (1 - confidence) / 2:
            break
        rank = k + 1
    return (rank - 1, runs - rank) if rank else None


def median_is_known(times: np.ndarray, precision: float | None) -> bool:
    """Whether the median of ``times`` is known to within ``precision`` (a fraction of it): its
    confidence interval (``median_interval_ranks``) lies within median x (1 +- precision)."""
    ranks = median_interval_ranks(len(times)) if precision is not None else None
    if ranks is None:
        return False
    ordered = np.sort(times)
    median = float(np.median(ordered))
    return median - ordered[ranks[0]] <= precision * median and ordered[ranks[1]] - median <= precision * median


EARLY_RUNS = 4
"""Timed runs after which a timing given a ``slower_than`` bound may end: when even the fastest of
them took at least the bound, the caller has what it asked (the artifact is no faster than that)
and the figures are those runs'. An artifact whose true median is below the bound ends early only
if all four runs land above its median, with probability at most 1/16, and less often the further
the bound sits above its median."""


def _stop_timing(times: np.ndarray, cfg: LatencyConfig, slower_than: float | None = None) -> bool:
    """After a timed run: ``times`` so far are enough (``median_is_known`` after the least runs),
    or, after ``EARLY_RUNS``, all at or above ``slower_than`` ms."""
    if slower_than is not None and len(times) == EARLY_RUNS and float(np.min(times)) >= slower_than:
        return True
    return len(times) >= min(cfg.min_timed_runs, cfg.timed_runs) and median_is_known(times, cfg.median_precision)


def latency_inputs(input_ids: np.ndarray, attention_mask: np.ndarray, cfg: LatencyConfig) -> dict[str, np.ndarray]:
    """A fixed batch of real texts, cut or repeated to batch_size x sequence_length tokens."""
    rows = np.resize(np.arange(len(input_ids)), cfg.batch_size)
    ids = np.zeros((cfg.batch_size, cfg.sequence_length), dtype=np.int64)
    mask = np.zeros_like(ids)
    width = min(cfg.sequence_length, input_ids.shape[1])
    ids[:, :width], mask[:, :width] = input_ids[rows, :width], attention_mask[rows, :width]
    mask[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


def time_runs_ms(path: Path, feeds: dict[str, np.ndarray], cfg: LatencyConfig) -> np.ndarray:
    return time_batches_ms(session(path, cfg.threads), feeds, cfg)


def time_batches_ms(sess, feeds: dict[str, np.ndarray], cfg: LatencyConfig,
                    loads: list[float | None] | None = None, slower_than: float | None = None) -> np.ndarray:
    """Wall times (ms) of the timed runs of ``sess`` on ``feeds`` after ``warmup_runs``: up to
    ``timed_runs``, fewer once their median is known (``LatencyConfig.median_precision``) or once
    ``EARLY_RUNS`` all took at least ``slower_than`` ms; ``loads``, when given, gets each timed
    run's contention (``machine_load``), read outside its timing."""
    for _ in range(cfg.warmup_runs):
        sess.run(None, feeds)
    times = np.empty(cfg.timed_runs)
    for i in range(cfg.timed_runs):
        before = take_sample() if loads is not None else None
        start = time.perf_counter()
        sess.run(None, feeds)
        times[i] = (time.perf_counter() - start) * 1e3
        if before is not None:
            loads.append(contention(before, take_sample(), cfg.threads, wall_s=times[i] / 1e3))
        if _stop_timing(times[: i + 1], cfg, slower_than):
            return times[: i + 1]
    return times


def summarize_ms(times: np.ndarray, runs: int | None = None) -> tuple[Metric, ...]:
    """Median, 90th percentile and spread of ``times`` (ms), and ``runs``: how many timed runs they
    come from (default: one a time)."""
    median = float(np.median(times))
    p10, p90 = (float(x) for x in np.percentile(times, [10, 90]))
    return (
        Metric("latency_ms", median, "ms", "median wall time of one batch"),
        Metric("latency_p90_ms", p90, "ms", "90th percentile wall time of one batch"),
        Metric("latency_spread", (p90 - p10) / median, "fraction", "(p90 - p10) / median"),
        Metric("latency_runs", float(len(times) if runs is None else runs), "runs",
               "timed runs the figures are of (fewer than timed_runs once the median was known)"),
    )


def shares_kv_buffer(path: Path | bytes, sess=None) -> bool:
    """True when every cache input of the decoder at ``path`` feeds a GroupQueryAttention node, whose
    CPU kernel then writes each step into the past buffer itself when past and present are bound to
    the same memory (a fused decoder's and ONNX Runtime GenAI's graphs; not a traced graph, which
    concatenates the cache with Concat nodes). slimtune's decoders say so in their metadata, read
    from the open session ``sess`` for free; other graphs are read from the file (seconds for a
    large one with its weights inside)."""
    import onnx

    if sess is not None:
        declared = sess.get_modelmeta().custom_metadata_map.get(KV_CACHE_KEY)
        if declared is not None:
            return declared == "shared-buffer"
    graph = (onnx.load_from_string(path) if isinstance(path, bytes)
             else onnx.load(str(path), load_external_data=False)).graph
    past = {i.name for i in graph.input if i.name.startswith("past_key_values.")}
    fed = {name for n in graph.node if n.op_type == "GroupQueryAttention" for name in n.input[3:5]}
    return bool(past) and past <= fed


def _past_shape(value_info, length: int, head_dim: int | None) -> tuple[int, ...]:
    batch, heads, _, dim = value_info.shape
    if not isinstance(dim, int):
        if head_dim is None:
            raise ValueError(f"the graph leaves the cache's head size symbolic ({dim!r}): pass head_dim")
        dim = head_dim
    return (1, int(heads), length, int(dim))


def greedy_generation(sess, prompt: np.ndarray, new_tokens: int, head_dim: int | None = None,
                      share_buffer: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(the ``new_tokens`` greedy tokens, ms of the prefill then of each step) of one generation at
    batch 1 from ``prompt`` (1, tokens) with the decoder session ``sess``.

    The cache stays in ONNX Runtime's memory as a server keeps it (IOBinding, no copies through
    numpy). ``share_buffer`` (``shares_kv_buffer``): past and present are bound to one buffer per
    block, sized for the whole generation, which the attention kernel appends to in place; without
    it each step's presents are bound as the next step's pasts. ``head_dim``: for other tools'
    graphs that leave it symbolic."""
    import onnxruntime as ort

    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    present_of = {p.name: p.name.replace("past_key_values.", "present.", 1) for p in pasts}
    binding = sess.io_binding()
    binding.bind_output("logits", "cpu")  # bound first: the outputs come back in binding order
    for p in pasts:
        buffer = ort.OrtValue.ortvalue_from_numpy(
            np.zeros(_past_shape(p, prompt.shape[1] + new_tokens if share_buffer else 0, head_dim), np.float32))
        binding.bind_ortvalue_input(p.name, buffer)
        if share_buffer:
            binding.bind_ortvalue_output(present_of[p.name], buffer)
        else:
            binding.bind_output(present_of[p.name], "cpu")
    times, tokens = [], []
    ids = prompt
    for step in range(new_tokens + 1):
        start = time.perf_counter()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, prompt.shape[1] + step), np.int64))
        binding.bind_output("logits", "cpu")  # its length changes after the prefill: allocated per step
        sess.run_with_iobinding(binding)
        values = binding.get_outputs()
        if not share_buffer:
            for p, value in zip(pasts, values[1:], strict=True):
                binding.bind_ortvalue_input(p.name, value)
                binding.bind_output(present_of[p.name], "cpu")
        ids = values[0].numpy()[:, -1:].argmax(axis=-1).astype(np.int64)
        times.append((time.perf_counter() - start) * 1e3)
        tokens.append(int(ids[0, 0]))
    return np.asarray(tokens[:new_tokens]), np.asarray(times)


def time_generation_ms(sess, prompt: np.ndarray, cfg: LatencyConfig, head_dim: int | None = None,
                       share_buffer: bool = False, loads: list[float | None] | None = None,
                       slower_than: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prefill ms per run, decode ms per step over all runs) of greedy generation at batch 1
    (``greedy_generation``) from ``prompt`` (1, tokens): ``warmup_runs`` untimed generations, then
    up to ``timed_runs`` timed ones of ``cfg.new_tokens`` tokens, fewer once the median of the
    generations' median step times is known (``LatencyConfig.median_precision``) or once
    ``EARLY_RUNS`` of them all stepped at ``slower_than`` ms or slower; ``loads``, when given, gets
    each timed generation's contention (``machine_load``)."""
    ttft, steps, step_medians = [], [], []
    for run in range(cfg.warmup_runs + cfg.timed_runs):
        before = take_sample() if loads is not None and run >= cfg.warmup_runs else None
        _, times = greedy_generation(sess, prompt, cfg.new_tokens, head_dim, share_buffer)
        if before is not None:
            loads.append(contention(before, take_sample(), cfg.threads, wall_s=float(times.sum()) / 1e3))
        if run >= cfg.warmup_runs:
            ttft.append(times[0])
            steps.extend(times[1:])
            step_medians.append(float(np.median(times[1:])))
            if _stop_timing(np.asarray(step_medians), cfg, slower_than):
                break
    return np.asarray(ttft), np.asarray(steps)


def summarize_generation_ms(ttft: np.ndarray, steps: np.ndarray) -> tuple[Metric, ...]:
    per_token = summarize_ms(steps, runs=len(ttft))
    median = per_token[0].value
    return (
        Metric("latency_ms", median, "ms", "median time per generated token (batch 1, KV cache)"),
        Metric("latency_p90_ms", per_token[1].value, "ms", "90th percentile time per generated token"),
        per_token[2],
        per_token[3],
        Metric("ttft_ms", float(np.median(ttft)), "ms", "median time to first token (the prompt's prefill)"),
        Metric("tokens_per_s", 1e3 / median, "tokens/s", "generated tokens per second at the median step time"),
    )


def generation_prompt(feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first text of a latency batch as a batch-1 prompt, its padding cut off."""
    length = int(feeds["attention_mask"][0].sum()) if "attention_mask" in feeds else feeds["input_ids"].shape[1]
    return feeds["input_ids"][:1, :max(1, length)].astype(np.int64)


def _timed_once(sess, path: Path | bytes, feeds: dict[str, np.ndarray], cfg: LatencyConfig,
                slower_than: float | None = None) -> tuple[tuple[Metric, ...], float | None]:
    """The figures of one timing of the session ``sess`` (of ``path``) and their contention (the
    median of the timed runs')."""
    loads: list[float | None] = []
    if is_decoder(sess.get_inputs()):
        figures = summarize_generation_ms(*time_generation_ms(sess, generation_prompt(feeds), cfg,
                                                              share_buffer=shares_kv_buffer(path, sess), loads=loads,
                                                              slower_than=slower_than))
    else:
        figures = summarize_ms(time_batches_ms(sess, feeds, cfg, loads=loads, slower_than=slower_than))
    return figures, median_contention(loads)


def measure_latency(path: Path | bytes, feeds: dict[str, np.ndarray], cfg: LatencyConfig,
                    lock: NodeLock | None = None,
                    hold: Callable[[], AbstractContextManager] | None = None,
                    slower_than: float | None = None,
                    opening: Callable[[], AbstractContextManager] | None = None) -> tuple[Metric, ...]:
    """Time ``path`` (a file, or a serialized graph in memory) on ``feeds`` (a decoder with a KV cache: generation from the first text of
    ``feeds``, module docstring); each attempt under ``lock`` held exclusively when given, or inside
    ``hold()`` (callers that hold it already pass neither). The session is opened before, inside
    ``opening()`` (default: ``lock`` held shared): opening it (graph optimisation, weight
    prepacking) is not what is timed and needs no quiet machine, but is heavy work that must not
    run while another trial times.
    ``slower_than`` (ms): a caller that only needs to know whether the artifact is at least that
    slow lets a timing end after ``EARLY_RUNS`` runs that all were (``latency_runs`` says how many).

    Other programs are not bound by the lock: a timing whose median run lost more than
    ``cfg.busy_threshold`` of its threads' CPU time to them (``machine_load``) is repeated up to
    ``cfg.busy_retries`` times after a pause, and the quietest attempt is kept. Its
    ``cpu_contention`` (fraction) is among the figures, and ``machine_busy`` is 1.0 when even that
    attempt was over the threshold."""
    attempts: list[tuple[float | None, tuple[Metric, ...]]] = []
    opening = opening or (lock.shared if lock is not None else contextlib.nullcontext)
    with opening():
        sess = session(path, cfg.threads)
    hold = hold or (lock.exclusive if lock is not None else contextlib.nullcontext)
    for attempt in range(cfg.busy_retries + 1):
        if attempt:  # the pause without the node: the other trials work on while other programs' burst passes
            time.sleep(BUSY_PAUSE_S)
        with hold():
            figures, lost = _timed_once(sess, path, feeds, cfg, slower_than)
        attempts.append((lost, figures))
        if lost is None or not is_busy(lost, cfg.busy_threshold):
            break
    lost, figures = min(attempts, key=lambda a: a[0] or 0.0)  # None: no counters here, one attempt
    if lost is None:
        return figures
    return (*figures,
            Metric("cpu_contention", lost, "fraction", "share of the timed threads' CPU time other work took"),
            Metric("machine_busy", float(is_busy(lost, cfg.busy_threshold)), "flag",
                   f"1: other work took more than {cfg.busy_threshold:.0%} of it in every attempt"))
