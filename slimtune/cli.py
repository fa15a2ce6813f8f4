"""The ``slimtune`` command line: search, baseline, ui.

Bad input (a config, a model, data, a store or a cluster that cannot be used) ends with one line
on stderr that names the problem and the fix, exit code 2, and nothing written under results/.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from slimtune.config import ConfigError, load_config, parse_duration_s

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console(log_path=False)
errors = Console(stderr=True)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@app.callback()
def _quiet_libraries() -> None:
    """Once per command: MLflow's own log at warnings (its store migrations would run over the
    progress display). The library leaves the caller's logging as it is."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def fail(message: str) -> typer.Exit:
    errors.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _results_dir(results: Path, name: str | None, prefix: str) -> tuple[str, Path]:
    name = name or f"{prefix}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if not _NAME.match(name):
        raise fail(f"--name {name!r} may hold only letters, digits, '.', '_' and '-': choose another name")
    out = results / name
    if out.exists():
        raise fail(f"{out} already exists: choose another --name or remove that folder")
    return name, out


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (see examples/)")]
ResultsOpt = Annotated[Path, typer.Option("--results-dir", help="where results and the default MLflow store live")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no live display: one plain line per event, as in a log")]


def _console(quiet: bool) -> Console:
    """The CLI's console; with ``--quiet`` one that is not a terminal, so progress prints plain lines."""
    return Console(log_path=False, force_terminal=False, no_color=True) if quiet else console


@app.command()
def search(
    config_path: ConfigOpt = None,
    trials: Annotated[int | None, typer.Option("--trials", help="number of trials")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="trials evaluated at once")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="sampler seed")] = None,
    time_budget: Annotated[str | None, typer.Option("--time-budget", help="stop after e.g. 90s, 30m, 8h")] = None,
    name: Annotated[str | None, typer.Option("--name", help="search name: results/<name>/ and the MLflow run")] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow store; default sqlite under results/")] = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster address; default a local Ray")] = None,
    sampler: Annotated[str | None, typer.Option("--sampler", help="nsga2 (default), tpe, or random (a baseline)")] = None,
    patience: Annotated[int | None, typer.Option("--patience", help="stop after N trials without hypervolume gain")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="continue the search NAME whose driver died")] = None,
    results: ResultsOpt = Path("results"),
    quiet: QuietOpt = False,
) -> None:
    """Search per-layer bits x FFN sparsity x rank; log the front to MLflow and results/<name>/."""
    if resume is not None:
        _resume(resume, address, results, _console(quiet))
        return
    try:
        budget = parse_duration_s(time_budget) if time_budget else None
        config = load_config(config_path, {
            "search": {"trials": trials, "workers": workers, "seed": seed, "time_budget_s": budget,
                       "address": address, "sampler": sampler, "patience": patience},
            "tracking": {"uri": tracking_uri},
        })
    except ConfigError as exc:
        raise fail(str(exc)) from None
    name, _ = _results_dir(results, name, "search")
    from slimtune import api
    from slimtune.workflow import BAD_INPUT

    try:
        api.search(config, name, results, console=_console(quiet))
    except BAD_INPUT as exc:
        raise fail(str(exc)) from None


def _resume(name: str, address: str | None, results: Path, out: Console) -> None:
    """Continue a search from its saved state (its own config; ``--address`` may point elsewhere now)."""
    from slimtune import api
    from slimtune.workflow import BAD_INPUT

    if not _NAME.match(name):
        raise fail(f"--resume {name!r} is not a search name: give the --name of the search to continue")
    try:
        api.search(name=name, results_dir=results, resume=True, console=out, address=address)
    except BAD_INPUT as exc:
        raise fail(str(exc)) from None


@app.command()
def export(
    name: Annotated[str, typer.Argument(help="the finished search (its --name)")],
    out: Annotated[Path, typer.Option("--out", help="the folder to write (must not exist)")],
    trial: Annotated[str | None, typer.Option("--trial", help="this front point, e.g. trial-007")] = None,
    max_latency_ms: Annotated[float | None, typer.Option("--max-latency-ms")] = None,
    max_size_mb: Annotated[float | None, typer.Option("--max-size-mb")] = None,
    min_accuracy: Annotated[float | None, typer.Option("--min-accuracy", help="floor on the search's metric "
                                                       "(perplexity: ceiling)")] = None,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="points below fp32 at most (perplexity: "
                                                   "percent above fp32)")] = None,
    prefer: Annotated[str | None, typer.Option("--prefer", help="best, fastest or smallest among those that qualify")] = None,
    knee: Annotated[bool, typer.Option("--knee", help="the knee of the front")] = False,
    latency_tolerance: Annotated[float, typer.Option("--latency-tolerance", help="same-hardware latency check")] = 0.25,
    register_as: Annotated[str | None, typer.Option("--register", help="register in the MLflow Model Registry")] = None,
    alias: Annotated[str | None, typer.Option("--alias", help="alias of the registered version, e.g. champion")] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="default: the search's store")] = None,
    results: ResultsOpt = Path("results"),
    quiet: QuietOpt = False,
) -> None:
    """Choose a front point by a rule, rebuild and verify it, and write a folder that runs on its own."""
    from rich.table import Table

    from slimtune import api
    from slimtune.release import ChoiceError, ReleaseError, Rule
    from slimtune.workflow import BAD_INPUT

    if prefer not in (None, "best", "fastest", "smallest"):
        raise fail(f"--prefer {prefer!r}: choose best, fastest or smallest")
    rule = Rule(trial=trial, max_latency_ms=max_latency_ms, max_size_mb=max_size_mb, min_score=min_accuracy,
                max_drop=max_drop, prefer=prefer, knee=knee)
    try:
        exported, model_uri = api.export(name, out, rule, results, latency_tolerance, register_as, alias, tracking_uri,
                                         console=_console(quiet))
    except (ChoiceError, ReleaseError, *BAD_INPUT) as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"{exported.trial} ({exported.rule}): verified, SHA-256 {exported.artifact_sha256[:12]}")
    for column in ("figure", "logged in the search", "re-measured now"):
        table.add_column(column, justify="right")
    for key, value in exported.figures.items():
        logged = exported.logged.get(key)
        table.add_row(key, "-" if logged is None else f"{logged:.4f}", f"{value:.4f}")
    console.print(table)
    if not exported.same_hardware:
        console.print("the search measured on other hardware: the latency above is this machine's, new figures")
    console.print(f"shipped: {exported.folder}/ (model.onnx, tokenizer, plan.json, metrics.json, README.md)")
    if model_uri:
        console.print(f"registered: {model_uri}" + (f", alias {alias!r}: models:/{register_as}@{alias}" if alias else ""))


@app.command()
def apply(
    plan: Annotated[Path, typer.Argument(help="a plan.json (a search's plans/ or an exported folder)")],
    model: Annotated[str, typer.Option("--model", help="the new checkpoint: a local folder or a hub id")],
    out: Annotated[Path, typer.Option("--out", help="the folder to write (must not exist)")],
    search_name: Annotated[str | None, typer.Option("--search", help="score on this search's task and settings")] = None,
    config_path: ConfigOpt = None,
    results: ResultsOpt = Path("results"),
) -> None:
    """Compress a retrained checkpoint of the same architecture with a chosen plan, and measure it."""
    from slimtune import api
    from slimtune.workflow import BAD_INPUT

    if search_name is not None:
        config_path = results / search_name / "search_config.yaml"
        if not config_path.is_file():
            raise fail(f"no finished search {search_name!r} in {results}: give --search NAME of a finished search")
    try:
        config = load_config(config_path)
        applied = api.apply(plan, model, out, config, results, console=console)
    except BAD_INPUT as exc:
        raise fail(str(exc)) from None
    from slimtune.report import figures_table

    console.print(figures_table(f"{model} with {plan}", "model", [(model, applied.figures)], applied.metric))
    console.print(f"written: {out}/ (model.onnx, plan.json, metrics.json)")


@app.command()
def baseline(
    config_path: ConfigOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="results/<name>/ for baseline.csv")] = None,
    results: ResultsOpt = Path("results"),
) -> None:
    """Measure fp32, uniform int8 (per-channel) and uniform 4-bit side by side, in one run."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    name, out = _results_dir(results, name, "baseline")
    from slimtune.workflow import BAD_INPUT, run_baseline_job

    try:
        run_baseline_job(config, out, results, console)
    except BAD_INPUT as exc:
        raise fail(str(exc)) from None


@app.command()
def ui(
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="default: the sqlite store under results/")] = None,
    port: Annotated[int, typer.Option("--port")] = 5000,
    results: ResultsOpt = Path("results"),
) -> None:
    """Serve the MLflow UI for the store on http://127.0.0.1:PORT."""
    from slimtune.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri(results)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise fail(f"no MLflow store at {uri}: run `slimtune search` first or pass --tracking-uri")
    console.print(f"MLflow UI for {uri} on http://127.0.0.1:{port} (Ctrl-C stops it)")
    from mlflow.tracking import MlflowClient

    for experiment in MlflowClient(tracking_uri=uri).search_experiments():
        console.print(f"runs of experiment {experiment.name!r}: http://127.0.0.1:{port}/#/experiments/"
                      f"{experiment.experiment_id}/runs?workflowType=machine_learning", soft_wrap=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    command = [mlflow, "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--artifacts-destination", str((results / "mlartifacts").resolve())]
    server = subprocess.Popen(command, env=env, start_new_session=True)  # its own group: its workers end with it

    def stop(*_: object) -> None:
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    try:
        raise typer.Exit(server.wait())
    except KeyboardInterrupt:
        stop()
        server.wait()
        raise typer.Exit(0) from None
