"""Long phases report progress live on a terminal and as plain, throttled lines in a log."""

from __future__ import annotations

import io

from rich.console import Console

from slimtune.phases import Phase


def test_outside_a_terminal_a_phase_prints_plain_lines_at_its_start_every_interval_and_its_end(monkeypatch):
    import slimtune.phases as phases

    clock = iter([0.0, 1.0, 12.0, 13.0, 30.0, 31.0])
    monkeypatch.setattr(phases.time, "monotonic", lambda: next(clock))
    log = io.StringIO()
    console = Console(file=log, force_terminal=False, width=200)
    with Phase(console, "distillation recovery", total=3) as phase:
        phase.update(0, detail="point 1: step 10/200")  # 1 s after the start: too soon for a line
        phase.update(1, detail="point 2: step 5/200")  # 12 s: a line
        phase.update(1, detail="point 2: step 9/200")  # 13 s: too soon
        phase.update(3, detail="front points distilled")  # the last: always a line
    lines = log.getvalue().splitlines()
    assert lines == ["distillation recovery ...", "distillation recovery: 1/3 point 2: step 5/200",
                     "distillation recovery: 3/3 front points distilled", "distillation recovery: done in 31 s"]
    assert "\x1b" not in log.getvalue() and "\r" not in log.getvalue()


def test_on_a_terminal_a_phase_is_a_live_bar_that_leaves_no_lines():
    log = io.StringIO()
    console = Console(file=log, force_terminal=True, width=120)
    with Phase(console, "re-measuring", total=2) as phase:
        phase.update(1, detail="points timed")
    assert "re-measuring ..." not in log.getvalue() and "done in" not in log.getvalue()


def test_quiet_cli_output_is_not_a_terminal():
    from slimtune.cli import _console

    assert not _console(True).is_terminal
