"""benchmarks/revisions.py: an earlier revision runs from its own tree, in the driver and in subprocesses."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from revisions import PACKAGE_FOLDERS, earlier_revision, imported_from  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0,
                    reason="not a git checkout: there is no earlier revision to check out")
def test_an_earlier_revision_is_imported_from_its_checkout_and_removed_after():
    with earlier_revision("HEAD") as checkout:
        origin = imported_from(checkout.python)
        assert origin == {name: str(checkout.tree / folder) for name, folder in PACKAGE_FOLDERS.items()}
        # a child process of that interpreter (what a Ray worker is) imports the same tree
        code = "import subprocess, sys; print(subprocess.run([sys.executable, '-c', 'import slimtune.search as s; " \
               "print(s.__path__[0])'], capture_output=True, text=True).stdout.strip())"
        child = subprocess.run([str(checkout.python), "-c", code], capture_output=True, text=True, check=True, cwd="/")
        assert child.stdout.strip() == str(checkout.tree / "search")
        # the packages of this environment are found as well
        assert subprocess.run([str(checkout.python), "-c", "import torch, onnxruntime"], cwd="/").returncode == 0
    assert not checkout.tree.exists()
    listed = subprocess.run(["git", "worktree", "list"], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout
    assert str(checkout.tree) not in listed
