"""A search's state on disk, so that a search whose driver died (even by SIGKILL) can be resumed.

In ``results/.work/<name>/``:

* ``search.json``: what the search needs to go on (resolved config, model, task file, MLflow
  parent run, the driver's process id and its local Ray session), written when it starts;
* ``trials.jsonl``: one line per finished trial, appended and flushed to disk as each one ends;
* ``optuna.db``: the Optuna study itself (Optuna's SQLite storage), so the sampler continues from
  every trial it has seen, enqueued reference points included.

Resuming ends what the dead driver left running (the processes of its local Ray session, found by
that session's folder on their command lines, each ended by its PID), marks the study's
unfinished trials failed, and runs the remaining trials with numbers after the old ones.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from slimtune.files import write_atomically
from slimtune.search.records import TrialRecord

STATE_FILE = "search.json"
JOURNAL_FILE = "trials.jsonl"
STUDY_FILE = "optuna.db"


class ResumeError(RuntimeError):
    """A search cannot be resumed; the message says why and what to do."""


@dataclass(frozen=True)
class SearchState:
    name: str
    out: str
    config_yaml: str
    tracking_uri: str
    parent_run_id: str
    driver_pid: int
    ray_session: str  # the local Ray session folder the driver started ('' on a cluster)
    started_at: float  # time.time() when the search first started

    def save(self, work: Path) -> None:
        write_atomically(work / STATE_FILE, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, work: Path) -> SearchState:
        path = work / STATE_FILE
        if not path.is_file():
            raise ResumeError(f"no search to resume in {work}: it never started, or it finished; "
                              "start a new one with another --name")
        data = json.loads(path.read_text())
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def study_uri(work: Path) -> str:
    return f"sqlite:///{(work / STUDY_FILE).resolve()}"


class TrialJournal:
    """Listener: appends each finished trial to ``trials.jsonl`` and syncs it to disk at once."""

    def __init__(self, work: Path) -> None:
        self.path = work / JOURNAL_FILE

    def trial_started(self, record: TrialRecord) -> None:
        pass

    def trial_finished(self, record: TrialRecord) -> None:
        if record.status == "stopped":
            return  # not finished: a resumed search samples again in its place
        line = json.dumps(asdict(record), default=str)
        with self.path.open("a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    @staticmethod
    def load(work: Path) -> list[TrialRecord]:
        """The finished trials, in number order (a line torn by the kill is skipped)."""
        path = work / JOURNAL_FILE
        records: dict[int, TrialRecord] = {}
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                data: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[data["number"]] = TrialRecord(**data)
        return [records[n] for n in sorted(records)]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists() and "zombie" not in _status(pid)


def driver_running(pid: int) -> bool:
    """A live slimtune process has this PID (a PID reused by another program does not count)."""
    try:
        return process_alive(pid) and b"slimtune" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return ""


def _belongs_to(proc: Path, marker: str) -> bool:
    """The process names the session on its command line or holds a file of it open (Ray's agents
    rename themselves ``ray::DashboardAgent``, but keep their session's log files open)."""
    if marker.encode() in (proc / "cmdline").read_bytes():
        return True
    for fd in (proc / "fd").iterdir():
        try:
            if marker in os.readlink(fd):
                return True
        except OSError:
            continue
    return False


def session_processes(session_dir: str) -> list[int]:
    """PIDs of this machine's processes that belong to the Ray session folder ``session_dir``."""
    if not session_dir:
        return []
    marker = Path(session_dir).name
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if _belongs_to(proc, marker):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def end_processes(pids: list[int], grace_s: float = 5.0) -> list[int]:
    """SIGTERM each PID, then SIGKILL what is still alive after ``grace_s``; returns the PIDs ended."""
    ended = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            ended.append(pid)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(process_alive(p) for p in ended):
        time.sleep(0.1)
    for pid in ended:
        if process_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return ended


def end_session(session_dir: str, rounds: int = 5) -> list[int]:
    """End every process of a Ray session on this machine, by PID, again until none is left (a dying
    raylet may still start a worker): returns the PIDs ended."""
    ended: list[int] = []
    for _ in range(rounds):
        pids = session_processes(session_dir)
        if not pids:
            break
        ended += end_processes(pids)
    return ended


def local_ray_session() -> str:
    """The session folder of the Ray runtime this driver started locally ('' when none)."""
    try:
        import ray

        node = ray._private.worker._global_node  # noqa: SLF001 - the only handle on the session folder
        return node.get_session_dir_path() if node is not None and node.head else ""
    except Exception:  # noqa: BLE001 - no local Ray: nothing to end later
        return ""


def fail_unfinished_study_trials(work: Path, study_name: str) -> int:
    """Mark the study's trials that were running when the driver died as failed; returns how many."""
    import optuna

    storage = optuna.storages.RDBStorage(study_uri(work))
    study = optuna.load_study(study_name=study_name, storage=storage)
    running = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for trial in running:
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # noqa: SLF001
    return len(running)
