"""An earlier revision of slimtune next to this checkout, for benchmarks that compare the two.

``earlier_revision(rev)`` checks ``rev`` out with ``git worktree`` in a temporary folder outside the
checkout (a tree inside it would be seen as packages of it) and makes an interpreter that imports
that tree: a virtual environment whose site-packages reads this environment's installed packages
and maps ``slimtune``, ``slimtune.search``, ``slimtune.spaces`` and ``slimtune.evaluators`` to the
earlier tree, as the editable install maps them to this checkout. Ray starts its workers with the
driver's interpreter, so a search run with it runs the earlier code in every trial too.

``timed_search(python, ...)`` runs one default search in a fresh process with the given
interpreter, in a folder of its own (no cache shared between revisions), and returns its figures.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# the installed packages and the folders they come from (pyproject.toml's package-dir)
PACKAGE_FOLDERS = {"slimtune": "slimtune", "slimtune.search": "search", "slimtune.spaces": "spaces",
                   "slimtune.evaluators": "evaluators"}
_FINDER = '''"""Imports slimtune from {tree} (benchmarks/revisions.py)."""
import importlib.util
import sys
from importlib.machinery import PathFinder

MAPPING = {mapping!r}


class _TreeFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname in MAPPING:
            init = MAPPING[fullname] + "/__init__.py"
            return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[MAPPING[fullname]])
        return None


def install():
    sys.meta_path.insert(0, _TreeFinder)
'''


@dataclass(frozen=True)
class Checkout:
    """An earlier revision's tree and the interpreter that imports it."""

    revision: str
    tree: Path
    python: Path


@contextlib.contextmanager
def earlier_revision(revision: str) -> Iterator[Checkout]:
    """``revision`` checked out and importable (see module doc); both removed on exit."""
    with tempfile.TemporaryDirectory(prefix="slimtune-earlier-") as scratch:
        tree = Path(scratch) / f"tree-{revision}"
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "--detach", str(tree), revision], check=True, capture_output=True)
        try:
            env = Path(scratch) / "env"
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
            site = Path(subprocess.run([str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       check=True, capture_output=True, text=True).stdout.strip())
            mapping = {name: str(tree / folder) for name, folder in PACKAGE_FOLDERS.items()}
            (site / "_slimtune_tree_finder.py").write_text(_FINDER.format(tree=tree, mapping=mapping))
            # this environment's packages (a path line: their own .pth files, the editable finder
            # among them, are not run), then the finder that maps slimtune to the earlier tree
            (site / "slimtune_earlier.pth").write_text(
                f"{sysconfig.get_paths()['purelib']}\n"
                "import _slimtune_tree_finder; _slimtune_tree_finder.install()\n")
            yield Checkout(revision, tree, env / "bin" / "python")
        finally:
            subprocess.run([*git, "remove", "--force", str(tree)], check=False, capture_output=True)


def imported_from(python: Path | str) -> dict[str, str]:
    """Where ``python`` imports each slimtune package from (a check that a checkout is the one run)."""
    code = ("import importlib, json; print(json.dumps({n: importlib.import_module(n).__path__[0] for n in "
            + repr(list(PACKAGE_FOLDERS)) + "}))")
    done = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True, cwd=tempfile.gettempdir())
    return json.loads(done.stdout)


def timed_search(python: Path | str, folder: Path, trials: int, seed: int) -> dict[str, Any]:
    """One default search (NSGA-II with the sensitivity profile, recovery off) by ``python``'s
    slimtune in a fresh process, in ``folder``; its ``Run`` figures as a dict (search_runs.py)."""
    folder = folder.resolve()  # the search runs in it
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "run.json"
    subprocess.run([str(python), str(Path(__file__).resolve()), str(folder), str(trials), str(seed), str(out)],
                   check=True, cwd=folder)
    return json.loads(out.read_text())


def _search_here(folder: Path, trials: int, seed: int, out: Path) -> None:
    """In this process (started by ``timed_search``): the search, with the packages' origin checked
    in the driver and in a Ray worker."""
    from dataclasses import asdict

    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from search_runs import run_search

    import slimtune
    import slimtune.search
    from slimtune.config import load_config
    from slimtune.search.runner import start_ray

    start_ray(None)
    worker = ray.get(ray.remote(lambda: __import__("slimtune.search").search.__path__[0]).remote())
    origin = {"driver": [slimtune.__path__[0], slimtune.search.__path__[0]], "worker": worker}
    try:  # this code: prepare prints nothing
        from slimtune.prepare import prepare

        prepared = prepare(load_config(None), folder / "results")
    except ImportError:  # a revision from before slimtune.prepare: its prepare printed to a console
        from rich.console import Console

        from slimtune.workflow import prepare

        prepared = prepare(load_config(None), folder / "results", Console(quiet=True))
    metric = prepared.config.task.metric
    run = run_search("default", "nsga2", seed, trials, folder / "results", {"search": {"sensitivity": True}}, metric)
    ray.shutdown()
    figures = asdict(run)
    figures.update(origin=origin, trials_per_hour=run.trials_per_hour(), time_split=run.time_split())
    out.write_text(json.dumps(figures))


if __name__ == "__main__":
    _search_here(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))


def trials_per_hour_side_by_side(revision: str, trials: int, rounds: int, work: Path) -> list[str]:
    """The default search by ``revision`` and by this checkout, ``rounds`` times interleaved (seed =
    round), each in a fresh process: a markdown table of trials per hour and the time split per
    trial, the ratio, and whether the same plans built the same bytes in both."""
    from search_runs import TIME_PARTS

    shutil.rmtree(work, ignore_errors=True)  # no cache of an earlier comparison
    runs: dict[str, list[dict[str, Any]]] = {f"{revision} (earlier)": [], "this code": []}
    with earlier_revision(revision) as earlier:
        pythons = dict(zip(runs, (earlier.python, Path(sys.executable)), strict=True))
        for label, python in pythons.items():
            print(f"{label}: slimtune from {imported_from(python)['slimtune.search']}", flush=True)
        for round_ in range(rounds):
            for label, python in pythons.items():
                figures = timed_search(python, work / f"round{round_}-{'earlier' if python != Path(sys.executable) else 'this'}",
                                       trials, round_)
                print(f"{label}, round {round_}: {figures['trials_per_hour']:.0f} trials/h "
                      f"(worker: {figures['origin']['worker']})", flush=True)
                runs[label].append(figures)
    parts = [*TIME_PARTS, "overhead_s", "wall_per_trial_s"]
    lines = ["| code | trials/h | " + " | ".join(p.removesuffix("_s") for p in parts) + " |",
             "|---|---|" + "---|" * len(parts)]
    rates = {}
    for label, group in runs.items():
        rates[label] = sum(r["trials_per_hour"] for r in group) / len(group)
        split = {p: sum(r["time_split"][p] for r in group) / len(group) for p in parts}
        lines.append(f"| {label} | {rates[label]:.0f} | " + " | ".join(f"{split[p]:.2f}" for p in parts) + " |")
    before, after = runs.values()
    same, total, other_modes = _same_bytes(before, after)
    earlier_rate, this_rate = rates.values()
    lines += ["", f"{this_rate / earlier_rate:.2f}x the trials per hour of {revision} ({trials} trials a search, "
              f"{rounds} rounds interleaved); the same bytes for {same} of {total} plans both searches built "
              f"with the same kernel modes" + (f" ({other_modes} more built under kernel modes the two searches "
                                               "measured differently, not compared)" if other_modes else "")]
    return lines


def _same_bytes(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> tuple[int, int, int]:
    """Over the rounds: (plans with the same bytes, plans both built with the same kernel modes,
    plans both built under different measured modes). The modes are an input of the bytes (and a
    measurement, which can differ between two searches where two modes time alike)."""
    same = total = other_modes = 0
    for a, b in zip(before, after, strict=True):
        built = {p.get("plan"): p for p in _artifacts(a)}
        for mine in _artifacts(b):
            theirs = built.get(mine.get("plan"))
            if theirs is None or not mine.get("sha256"):
                continue
            if theirs.get("kernel_modes", "") != mine.get("kernel_modes", ""):
                other_modes += 1
                continue
            total += 1
            same += theirs.get("sha256") == mine["sha256"]
    return same, total, other_modes


def _artifacts(figures: dict[str, Any]) -> list[dict[str, str]]:
    return figures.get("notes", {}).get("artifacts", [])
