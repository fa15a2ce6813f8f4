"""Files and folders readers never see half-written."""

from __future__ import annotations

import pytest

from slimtune.files import private_name, staged_folder, write_atomically, write_with


def test_a_private_name_is_hidden_unique_and_keeps_the_suffix(tmp_path):
    target = tmp_path / "task.npz"
    names = {private_name(target) for _ in range(20)}
    assert len(names) == 20
    assert all(n.parent == tmp_path and n.name.startswith(".") and n.suffix == ".npz" for n in names)


def test_a_file_is_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    target = tmp_path / "deep" / "state.json"
    write_atomically(target, "old")
    write_atomically(target, b"new")
    assert target.read_text() == "new"

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_with(target, broken)
    assert target.read_text() == "new" and [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "results" / "search"
    out.parent.mkdir()
    with pytest.raises(KeyboardInterrupt), staged_folder(out) as staging:
        (staging / "pareto.csv").write_text("x")
        raise KeyboardInterrupt
    assert list(out.parent.iterdir()) == []
    with staged_folder(out) as staging:
        (staging / "pareto.csv").write_text("x")
        assert not out.exists()
    assert (out / "pareto.csv").read_text() == "x" and [p.name for p in out.parent.iterdir()] == ["search"]
