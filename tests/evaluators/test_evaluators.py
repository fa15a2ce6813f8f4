from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest

from slimtune.config import LatencyConfig, ModelConfig, TaskConfig
from slimtune.evaluators.latency import latency_inputs, measure_latency, summarize_ms
from slimtune.evaluators.node_lock import NodeLock
from slimtune.evaluators.quality import measure_quality
from slimtune.evaluators.size import measure_size
from slimtune.export import build_artifact
from slimtune.model import load_model, wrap_output
from slimtune.plan import CompressionPlan
from slimtune.tasks import choose_task, load_texts, prepare_task
from slimtune.tasks.base import torch_run
from slimtune.tasks.embedding_head import score


@pytest.fixture(scope="module")
def scored(tiny_model_dir, tiny_csv, tmp_path_factory):
    loaded = load_model(str(tiny_model_dir))
    model_cfg = ModelConfig(name=str(tiny_model_dir), max_length=32)
    cfg = TaskConfig(data=str(tiny_csv), text_column="body", label_column="topic")
    data = load_texts(cfg)
    choice = choose_task(model_cfg, cfg, loaded.source, data)
    task, _ = prepare_task(model_cfg, cfg, choice, loaded, data, tmp_path_factory.mktemp("cache"))
    path = build_artifact(loaded.module, CompressionPlan(), tmp_path_factory.mktemp("a") / "m.onnx").path
    return loaded, task, path


def test_quality_of_the_exported_file_matches_torch(scored):
    loaded, task, path = scored
    metrics = {m.name: m for m in measure_quality(path, task)}
    assert set(metrics) == {"accuracy", "macro_f1"} and metrics["accuracy"].unit == "fraction"
    embeddings = torch_run(wrap_output(loaded.module, task.output))({"input_ids": task.input_ids,
                                                                      "attention_mask": task.attention_mask})
    torch_figures = {m.name: m.value for m in score(task, embeddings)}
    assert {name: m.value for name, m in metrics.items()} == pytest.approx(torch_figures)
    assert torch_figures == pytest.approx(task.reference)


def test_size_is_bytes_on_disk_in_mb(scored):
    _, _, path = scored
    (metric,) = measure_size(path)
    assert metric.value == path.stat().st_size / 1e6 and metric.unit == "MB"


def test_latency_reports_median_p90_and_spread(scored, tmp_path):
    _, task, path = scored
    cfg = LatencyConfig(batch_size=3, sequence_length=16, threads=1, warmup_runs=1, timed_runs=5)
    feeds = latency_inputs(task.input_ids, task.attention_mask, cfg)
    assert feeds["input_ids"].shape == (3, 16)
    metrics = {m.name: m for m in measure_latency(path, feeds, cfg, NodeLock(tmp_path / "lock"))}
    assert 0 < metrics["latency_ms"].value <= metrics["latency_p90_ms"].value
    assert metrics["latency_ms"].unit == "ms" and metrics["latency_spread"].value >= 0
    assert metrics["latency_runs"].value == 5  # fewer than 6 runs bound no median at 95%: all were run


def test_the_median_interval_is_distribution_free_order_statistics():
    from slimtune.evaluators.latency import median_interval_ranks, median_is_known

    assert median_interval_ranks(5) is None  # 2 / 2**5 = 6.25% outside: no 95% interval
    assert median_interval_ranks(6) == (0, 5)  # the extremes: 2 / 64 = 3.1% outside
    assert median_interval_ranks(20) == (5, 14)  # the 6th and 15th of 20, as the binomial tables give
    times = np.array([10.0, 10.1, 9.9, 10.05, 9.95, 10.0])
    assert median_is_known(times, 0.02) and not median_is_known(times, 0.001)
    assert not median_is_known(np.append(times[:5], 30.0), 0.02)  # with 6 runs the interval spans them all
    assert median_is_known(np.append(times, [10.02, 30.0, 9.98]), 0.02)  # with 9, one far run is outside it
    assert not median_is_known(times[:5], 0.5) and not median_is_known(times, None)


def test_timing_stops_once_the_median_is_known(scored):
    from slimtune.evaluators.latency import time_batches_ms
    from slimtune.evaluators.quality import session

    _, task, path = scored
    sess = session(path, 1)
    base = LatencyConfig(batch_size=3, sequence_length=16, threads=1, warmup_runs=1, timed_runs=40)
    feeds = latency_inputs(task.input_ids, task.attention_mask, base)
    loose = base.model_copy(update={"median_precision": 0.9})  # any 6 runs bound it that well
    assert len(time_batches_ms(sess, feeds, loose)) == 6
    assert len(time_batches_ms(sess, feeds, base.model_copy(update={"median_precision": None}))) == 40
    assert len(time_batches_ms(sess, feeds, loose.model_copy(update={"timed_runs": 4}))) == 4


def test_timing_ends_after_its_first_runs_once_all_were_at_least_the_bound(scored):
    from slimtune.evaluators.latency import EARLY_RUNS, time_batches_ms
    from slimtune.evaluators.quality import session

    _, task, path = scored
    sess = session(path, 1)
    cfg = LatencyConfig(batch_size=3, sequence_length=16, threads=1, warmup_runs=1, timed_runs=10,
                        median_precision=None)
    feeds = latency_inputs(task.input_ids, task.attention_mask, cfg)
    assert len(time_batches_ms(sess, feeds, cfg, slower_than=1e-6)) == EARLY_RUNS
    assert len(time_batches_ms(sess, feeds, cfg, slower_than=1e9)) == 10  # not that slow: timed in full
    assert len(time_batches_ms(sess, feeds, cfg)) == 10


def test_the_early_end_needs_every_one_of_the_first_runs_at_the_bound():
    from slimtune.evaluators.latency import EARLY_RUNS, _stop_timing

    cfg = LatencyConfig(timed_runs=20, median_precision=None)
    slow = np.full(EARLY_RUNS, 5.0)
    assert _stop_timing(slow, cfg, slower_than=5.0)
    assert not _stop_timing(np.append(slow[1:], 4.9), cfg, slower_than=5.0)  # one run faster than the bound
    assert not _stop_timing(slow[1:], cfg, slower_than=1.0)  # too few runs to say
    assert not _stop_timing(np.append(slow, 5.0), cfg, slower_than=1.0)  # decided once, after the first runs
    assert not _stop_timing(slow, cfg)


def test_a_busy_retry_pauses_without_holding_the_node(scored, monkeypatch):
    import contextlib

    import slimtune.evaluators.latency as latency
    from slimtune.evaluators import Metric

    _, task, path = scored
    events = []
    contention = iter([0.9, 0.01])  # the first attempt crowded out, the second quiet
    monkeypatch.setattr(latency, "_timed_once", lambda *a: ((Metric("latency_ms", 1.0, "ms"),), next(contention)))
    monkeypatch.setattr(latency.time, "sleep", lambda s: events.append(("pause", s)))

    @contextlib.contextmanager
    def hold():
        events.append("held")
        yield
        events.append("released")

    cfg = LatencyConfig(batch_size=3, sequence_length=16, threads=1, busy_retries=2)
    figures = {m.name: m.value for m in measure_latency(path, latency_inputs(task.input_ids, task.attention_mask, cfg),
                                                        cfg, hold=hold)}
    assert events == ["held", "released", ("pause", latency.BUSY_PAUSE_S), "held", "released"]
    assert figures["cpu_contention"] == 0.01 and figures["machine_busy"] == 0.0


def test_summary_statistics():
    metrics = {m.name: m.value for m in summarize_ms(np.array([10.0, 10, 10, 10, 20]))}
    assert metrics["latency_ms"] == 10 and metrics["latency_p90_ms"] == 16.0


def _hold(path, mode, log, seconds):
    lock = NodeLock(path)
    with lock.exclusive() if mode == "exclusive" else lock.shared():
        log.put((mode, "in", time.monotonic()))
        time.sleep(seconds)
        log.put((mode, "out", time.monotonic()))


def test_measurement_never_overlaps_other_work(tmp_path):
    ctx = mp.get_context("spawn")
    log = ctx.Queue()
    path = tmp_path / "cores.lock"
    shared = [ctx.Process(target=_hold, args=(path, "shared", log, 0.6)) for _ in range(2)]
    for p in shared:
        p.start()
    time.sleep(0.3)
    exclusive = ctx.Process(target=_hold, args=(path, "exclusive", log, 0.3))
    exclusive.start()
    for p in [*shared, exclusive]:
        p.join(20)
    events = sorted((log.get() for _ in range(6)), key=lambda e: e[2])
    ex_in = next(t for m, k, t in events if m == "exclusive" and k == "in")
    ex_out = next(t for m, k, t in events if m == "exclusive" and k == "out")
    shared_times = [(t, k) for m, k, t in events if m == "shared"]
    assert all(t <= ex_in or t >= ex_out for t, _ in shared_times)
    assert sum(k == "in" for _, k in shared_times) == 2


def test_staged_scoring_gives_the_full_figures_and_the_sample_first(scored):
    from slimtune.evaluators.quality import StagedQuality

    _, task, path = scored
    rows = task.sample_rows(5, seed=0)
    staged = StagedQuality(path, task, 1, rows)
    sample = {m.name: m.value for m in staged.first_stage()}
    expected_sample = {m.name: m.value for m in measure_quality(path, task.held_out_rows(rows))}
    assert sample == pytest.approx(expected_sample)
    assert {m.name: m.value for m in staged.full()} == pytest.approx({m.name: m.value for m in measure_quality(path, task)})
    assert len(rows) == 5 and list(rows) == sorted(rows)


def test_an_export_of_the_uncompressed_model_takes_its_figures_on_every_text(scored):
    import dataclasses

    from slimtune.evaluators.quality import StagedQuality

    _, task, path = scored
    rows = task.sample_rows(5, seed=0)
    assert task.uncompressed_outputs.shape[0] == len(task.input_ids)
    same = StagedQuality(path, task, 1, rows).uncompressed_figures()
    assert {m.name: m.value for m in same} == pytest.approx(task.reference)
    assert [m.description for m in same] == [m.description for m in measure_quality(path, task)]
    # outputs 1% away from the uncompressed model's are another function
    moved = dataclasses.replace(task, uncompressed_outputs=task.uncompressed_outputs * 1.01)
    assert StagedQuality(path, moved, 1, rows).uncompressed_figures() is None
    kept_none = dataclasses.replace(task, uncompressed_outputs=None)  # a task saved before they were kept
    assert StagedQuality(path, kept_none, 1, rows).uncompressed_figures() is None


def test_contention_is_the_share_of_cpu_time_lost_to_other_work():
    from slimtune.evaluators.machine_load import LoadSample, contention, is_busy

    # 2 threads for 1 s: 0.5 s of run-queue wait is a quarter of the 2 s they could have had
    assert contention(LoadSample(10.0, 1.0, None), LoadSample(11.0, 1.5, None), threads=2) == pytest.approx(0.25)
    assert contention(LoadSample(10.0, None, None), LoadSample(11.0, None, None), threads=2) is None
    assert not is_busy(None, 0.2) and is_busy(0.25, 0.2) and not is_busy(0.15, 0.2)
    # the span the caller timed itself, not the samples' own reading, when given
    assert contention(LoadSample(10.0, 1.0, None), LoadSample(11.0, 1.5, None), threads=2,
                      wall_s=0.5) == pytest.approx(0.5)


def test_a_median_figure_is_busy_only_when_its_median_run_was():
    from slimtune.evaluators.machine_load import median_contention

    # a burst that crowds out a few of the runs (a 10 ms steal tick on a sub-millisecond run) leaves
    # the median run, and with it the median latency, as it was
    assert median_contention([0.0, 1.0, 0.01, 0.9, 0.02]) == pytest.approx(0.02)
    assert median_contention([0.3, 0.5, 0.4, 0.0]) == pytest.approx(0.35)  # crowded out throughout
    assert median_contention([0.1, None]) is None and median_contention([]) is None


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_a_timing_other_programs_crowd_out_is_repeated_then_flagged(scored, monkeypatch, tmp_path):
    import os
    import subprocess
    import sys

    import slimtune.evaluators.latency as latency

    _, task, path = scored
    attempts = []
    timed_once = latency._timed_once
    monkeypatch.setattr(latency, "BUSY_PAUSE_S", 0.0)
    monkeypatch.setattr(latency, "_timed_once", lambda *a: attempts.append(1) or timed_once(*a))
    # runs of a few ms (longer than a scheduler time slice, so a program taking the cores preempts
    # them; the figure is their median, and so is the contention judged)
    cfg = LatencyConfig(batch_size=32, sequence_length=64, threads=min(2, os.cpu_count() or 1), warmup_runs=1,
                        timed_runs=60, busy_retries=1)
    feeds = latency_inputs(task.input_ids, task.attention_mask, cfg)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        busy = {m.name: m.value for m in measure_latency(path, feeds, cfg, NodeLock(tmp_path / "lock"))}
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert busy["cpu_contention"] > cfg.busy_threshold and busy["machine_busy"] == 1.0
    assert len(attempts) == 2  # the first attempt and one retry
    quiet = {m.name: m.value for m in measure_latency(path, feeds, cfg, NodeLock(tmp_path / "lock"))}
    assert 0.0 <= quiet["cpu_contention"] < busy["cpu_contention"]


def test_an_export_of_the_uncompressed_model_is_checked_on_a_few_texts_of_its_sample(scored, monkeypatch):
    import dataclasses

    import slimtune.evaluators.quality as quality
    from slimtune.evaluators.quality import StagedQuality

    _, task, path = scored
    rows = task.sample_rows(8, seed=0)
    scored_texts = []
    run_batches = quality.run_batches
    monkeypatch.setattr(quality, "run_batches", lambda run, ids, mask, *a, **k: (scored_texts.append(len(ids)),
                                                                                 run_batches(run, ids, mask, *a, **k))[1])
    same = StagedQuality(path, task, 1, rows)
    sample = {m.name: m.value for m in same.first_stage(uncompressed_check=3)}
    assert scored_texts == [3]  # the other five texts of the sample take the uncompressed model's outputs
    expected = {m.name: m.value for m in measure_quality(path, task.held_out_rows(rows))}
    assert sample == pytest.approx(expected)
    assert {m.name: m.value for m in same.uncompressed_figures()} == pytest.approx(task.reference)
    # another function is found on the checked texts: the whole sample is scored, once each, and
    # it takes no uncompressed figures
    scored_texts.clear()
    moved = dataclasses.replace(task, uncompressed_outputs=task.uncompressed_outputs * 1.01)
    other = StagedQuality(path, moved, 1, rows)
    assert {m.name: m.value for m in other.first_stage(uncompressed_check=3)} == pytest.approx(expected)
    assert scored_texts == [3, 5] and other.uncompressed_figures() is None
