"""Packaging guardrails: every subpackage ships, and rooms import only rooms above them."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"search": "slimtune.search", "spaces": "slimtune.spaces", "evaluators": "slimtune.evaluators"}

# Data flows one way; a module may import only modules of its own room or of earlier rooms.
ROOMS = [
    ("config", ["slimtune/config.py", "slimtune/errors.py", "slimtune/files.py"]),
    ("plan", ["slimtune/plan.py"]),
    ("model", ["slimtune/layout.py", "slimtune/model.py", "slimtune/tasks"]),
    ("spaces", ["spaces"]),
    ("transforms", ["slimtune/transforms"]),
    ("export", ["slimtune/export"]),
    ("evaluators", ["evaluators"]),
    ("search", ["search"]),
    ("tracking", ["slimtune/tracking"]),
    ("report", ["slimtune/report.py", "slimtune/plots.py", "slimtune/phases.py"]),
    ("cli", ["slimtune/prepare.py", "slimtune/front_phases.py", "slimtune/search_session.py", "slimtune/workflow.py",
             "slimtune/cli.py", "slimtune/release", "slimtune/api.py"]),
]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in MAPPED:
        parts = MAPPED[parts[0]].split(".") + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_every_package_folder_is_listed_for_the_wheel():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = set()
    for init in ROOT.glob("**/__init__.py"):
        rel = init.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", "build") or "site-packages" in rel.parts:
            continue
        on_disk.add(_module_of(init))
    assert on_disk == listed


def test_bare_top_level_imports_are_banned_for_ruff():
    banned = _pyproject()["tool"]["ruff"]["lint"]["flake8-tidy-imports"]["banned-api"]
    assert set(banned) == set(MAPPED)


def _room_of(module: str) -> int | None:
    for index, (_, paths) in enumerate(ROOMS):
        for p in paths:
            if module == _module_of(ROOT / p) or module.startswith(_module_of(ROOT / p) + "."):
                return index
    return None


def test_no_room_imports_a_later_room():
    violations = []
    for index, (room, paths) in enumerate(ROOMS):
        files = [f for p in paths for f in ((ROOT / p).rglob("*.py") if (ROOT / p).is_dir() else [ROOT / p])]
        for file in files:
            for node in ast.walk(ast.parse(file.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                for name in names:
                    target = _room_of(name) if name.startswith("slimtune") else None
                    if target is not None and target > index:
                        violations.append(f"{file.relative_to(ROOT)} ({room}) imports {name} ({ROOMS[target][0]})")
    assert not violations, violations


def test_the_installed_namespace_is_the_one_in_use():
    import slimtune.search

    assert Path(slimtune.search.__file__).resolve().parent == ROOT / "search"


@pytest.mark.parametrize("module", ["slimtune.search.pareto", "slimtune.search.records", "slimtune.search.objectives",
                                    "slimtune.tracking"])
def test_reading_a_search_loads_neither_torch_nor_ray(module):
    """The front, the records and the tracking store are read on machines (and in tools) that do not
    run trials: importing them must not pull in torch or Ray."""
    code = f"import sys, {module}; print(sorted({{'torch', 'ray'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", f"{module} imports {done.stdout.strip()}"
