"""TrialLog turns Ray's callback hooks into records; the front comes from Optuna's sorting."""

from __future__ import annotations

from types import SimpleNamespace

from slimtune.config import SpaceConfig
from slimtune.layout import discover_layout
from slimtune.search.objectives import objectives
from slimtune.search.pareto import pareto_numbers
from slimtune.search.records import TrialRecord
from slimtune.search.trial_log import TrialLog
from slimtune.spaces import SearchSpace


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[str, TrialRecord]] = []

    def trial_started(self, record: TrialRecord) -> None:
        self.events.append(("start", record))

    def trial_finished(self, record: TrialRecord) -> None:
        self.events.append(("end", record))


def _trial(trial_id, config, result=None, error_file=None):
    return SimpleNamespace(trial_id=trial_id, config=config, last_result=result, error_file=error_file)


def test_every_trial_ends_exactly_once(bert, tmp_path):
    space = SearchSpace(discover_layout(bert), SpaceConfig(group_size=2))
    listener = Listener()
    log = TrialLog(space, objectives("accuracy"), [listener])
    fp32 = space.reference_points()["fp32"]
    metrics = {"accuracy": 0.9, "latency_ms": 10.0, "size_mb": 1.0}
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback...\nValueError: broken plan\n")
    trials = [_trial("a", fp32, metrics), _trial("b", {}, None, str(error_file)), _trial("c", {}, {"accuracy": 1}),
              _trial("d", {})]
    for t in trials:
        log.on_trial_start(0, trials, t)
    log.on_trial_complete(0, trials, trials[0])
    log.on_trial_error(0, trials, trials[1])
    log.on_trial_complete(0, trials, trials[2])  # ended without all objectives: stopped
    log.on_trial_complete(0, trials, trials[0])  # a repeated hook changes nothing
    log.close_open_trials()
    records = log.records
    assert [r.status for r in records] == ["completed", "failed", "stopped", "stopped"]
    assert records[0].reference == "fp32" and records[1].reference == ""
    assert records[1].error == "ValueError: broken plan"
    assert [kind for kind, _ in listener.events] == ["start"] * 4 + ["end"] * 4
    assert "listeners" in log.__getstate__() and log.__getstate__()["listeners"] == ()


def test_the_listeners_work_inside_the_hold_they_are_given(bert):
    """The driver logs a trial to MLflow holding the node lock shared: never while a trial times."""
    import contextlib

    space = SearchSpace(discover_layout(bert), SpaceConfig(group_size=2))
    held: list[bool] = []
    inside = [False]

    @contextlib.contextmanager
    def hold():
        inside[0] = True
        yield
        inside[0] = False

    class Watching(Listener):
        def trial_started(self, record):
            held.append(inside[0])

        def trial_finished(self, record):
            held.append(inside[0])

    log = TrialLog(space, objectives("accuracy"), [Watching()], hold=hold)
    trials = [_trial("a", space.reference_points()["fp32"], {"accuracy": 0.9, "latency_ms": 1.0, "size_mb": 1.0})]
    log.on_trial_start(0, trials, trials[0])
    log.on_trial_complete(0, trials, trials[0])
    assert held == [True, True] and not inside[0]
    assert log.__getstate__()["hold"] is contextlib.nullcontext  # Ray pickles the callback, not the lock


def _record(number, accuracy, latency, size, digest=None, status="completed"):
    metrics = {"accuracy": accuracy, "latency_ms": latency, "size_mb": size, "plan_digest": digest or str(number)}
    return TrialRecord(number=number, trial_id=str(number), params={}, status=status, metrics=metrics)


def test_pareto_front_by_optuna():
    records = [
        _record(0, 0.97, 100, 90),   # most accurate
        _record(1, 0.96, 60, 23),    # fast and small
        _record(2, 0.95, 70, 30),    # dominated by 1
        _record(3, 0.90, 50, 25),    # fastest
        _record(4, 0.96, 60, 23, digest="1"),  # same plan as 1, measured again: counted once
        TrialRecord(number=5, trial_id="5", params={}, status="failed"),
    ]
    assert pareto_numbers(records, objectives("accuracy")) == {0, 1, 3}
    assert pareto_numbers([], objectives("accuracy")) == set()


def test_compressed_but_not_faster_is_measured_against_the_searchs_own_fp32():
    from slimtune.search.pareto import not_faster_numbers

    def done(number, latency, reference=""):
        return TrialRecord(number=number, trial_id=str(number), params={}, status="completed", reference=reference,
                           metrics={"accuracy": 0.9, "latency_ms": latency, "size_mb": 1.0})

    records = [done(0, 100.0, "fp32"), done(1, 60.0, "uniform-int8"), done(2, 100.0), done(3, 120.0),
               TrialRecord(number=4, trial_id="4", params={}, status="failed")]
    assert not_faster_numbers(records) == {2, 3}
    assert not_faster_numbers(records[1:]) == set()  # no fp32 reference measured: nothing to compare with


def test_recovered_records_say_where_they_come_from():
    record = TrialRecord(number=7, trial_id="recovered-x", params={}, recovered_from=3)
    assert record.label == "trial-007 (trial-003 recovered)"


def test_front_recovery_alternates_fastest_and_smallest_once_each():
    from slimtune.search.recovery import alternate

    records = [TrialRecord(number=n, trial_id=str(n), params={}) for n in range(4)]
    fastest, smallest = [records[0], records[1], records[2]], [records[0], records[2], records[3]]
    assert [r.number for r in alternate(fastest, smallest)] == [0, 1, 2, 3]
    assert [r.number for r in alternate(smallest, fastest)] == [0, 2, 1, 3]


def test_trials_timed_on_a_busy_machine_are_flagged_in_the_csvs_mlflow_and_a_warning(bert, tmp_path):
    import csv

    from mlflow.tracking import MlflowClient

    from slimtune.report import busy_lines, write_results
    from slimtune.tracking import MlflowSearchRun

    space = SearchSpace(discover_layout(bert), SpaceConfig(group_size=2))
    quiet = _record(0, 0.9, 10.0, 4.0)
    busy = _record(1, 0.8, 5.0, 2.0)
    quiet = TrialRecord(**{**quiet.__dict__, "metrics": {**quiet.metrics, "cpu_contention": 0.02, "machine_busy": 0.0}})
    busy = TrialRecord(**{**busy.__dict__, "metrics": {**busy.metrics, "cpu_contention": 0.61, "machine_busy": 1.0}})
    assert busy_lines([quiet], {0}) == []
    (line,) = busy_lines([quiet, busy], {0, 1})
    assert "1 of 2 trials" in line and "61%" in line and "trial-001" in line
    write_results(tmp_path / "out", [quiet, busy], {0, 1}, space, "", "accuracy")
    rows = {r["trial"]: r for r in csv.DictReader((tmp_path / "out" / "trials.csv").open())}
    assert (rows["trial-000"]["machine_busy"], rows["trial-001"]["machine_busy"]) == ("0", "1")
    assert float(rows["trial-001"]["cpu_contention"]) == 0.61

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowSearchRun.create(uri, "busy", "busy", space, {}, artifact_root=tmp_path / "artifacts")
    for record in (quiet, busy):
        tracker.trial_started(TrialRecord(record.number, record.trial_id, record.params))
        tracker.trial_finished(record)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([tracker.experiment_id], "tags.`slimtune.machine_busy` = 'true'")
    assert [r.info.run_name.split()[0] for r in runs] == ["trial-001"]
