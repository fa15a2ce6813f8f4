"""prepare(): what a search, an export and the benchmarks start from, found and returned, not printed."""

from __future__ import annotations

from slimtune.config import Config
from slimtune.prepare import prepare


def test_prepare_prints_nothing_and_returns_its_findings(tiny_config, tmp_path, capsys):
    prepared = prepare(Config.model_validate(tiny_config()), tmp_path)
    assert capsys.readouterr().out == ""
    lines = prepared.findings()
    assert lines[0].startswith(f"task: {prepared.task.kind} (") and lines[1].startswith(f"metric: {prepared.task.metric}")
    assert lines[-1].startswith(f"data: {len(prepared.task.input_ids)} held-out texts")
    assert prepared.config.task.kind == prepared.task.kind  # resolved: the logged config reproduces the search


def test_kernel_modes_are_measured_once_shown_and_filed_for_later_runs(tiny_config, tmp_path, monkeypatch):
    from rich.console import Console

    import slimtune.evaluators.kernel_modes as kernel_modes
    from slimtune.phases import Phase
    from slimtune.prepare import MODES_FOLDER, machine_kernel_modes

    config = Config.model_validate(tiny_config(space={"block_sizes": [32], "int4_methods": ["rtn"]}))
    prepared = prepare(config, tmp_path)
    seen: list[tuple[int | None, int | None, str]] = []

    class Recorded(Phase):
        def update(self, completed=None, total=None, detail=""):
            seen.append((completed, total, detail))
            super().update(completed, total, detail)

    measured = machine_kernel_modes(prepared, tmp_path, lambda text, total=None: Recorded(Console(quiet=True), text, total))
    assert [done for done, _, _ in seen] == list(range(1, kernel_modes.STEPS_PER_WIDTH + 1))  # one width: 4-bit
    assert {total for _, total, _ in seen} == {kernel_modes.STEPS_PER_WIDTH} and all(detail for _, _, detail in seen)
    assert {(f["level"], f["symmetric"]) for f in measured.figures} == {(0, False), (4, False), (0, True), (4, True)}
    filed = tmp_path / MODES_FOLDER / f"{measured.key}.json"
    assert kernel_modes.read_modes_record(filed.read_text()) == (measured.modes, list(measured.figures))
    assert kernel_modes.read_modes_record(measured.record()) == (measured.modes, list(measured.figures))

    def refuse(*args, **kwargs):
        raise AssertionError("filed modes are read, not measured again")

    monkeypatch.setattr(kernel_modes, "measure_modes", refuse)
    assert machine_kernel_modes(prepared, tmp_path) == measured  # a later run on this machine
    no_blockwise = config.model_copy(update={"space": config.space.model_copy(update={"weight_formats": ("fp32", "int8")})})
    assert machine_kernel_modes(prepare(no_blockwise, tmp_path), tmp_path) is None
