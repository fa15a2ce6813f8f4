"""Before a search, an export or a benchmark measures anything: the data read, the task kind
chosen, the model loaded, the scored task prepared (cached), the sensitivity profile, and this
machine's 4-bit kernel modes (cached).

Nothing here prints: long steps report to a ``PhaseFactory`` (``slimtune.phases``) and the
findings come back as values (``Prepared.findings``), which the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.config import BUILTIN_LLM, Config
from slimtune.export.modes import KernelModes
from slimtune.layout import ModelLayout, discover_layout
from slimtune.model import LoadedModel, load_model, resolve_model_source
from slimtune.phases import QUIET, PhaseFactory
from slimtune.tasks import PreparedTask, choose_task, default_data, load_texts, prepare_task


@dataclass(frozen=True)
class Prepared:
    """``config`` is resolved: ``task.kind``, ``task.metric`` and (embedding kinds) ``model.pooling``
    hold what was detected, so the logged config reproduces the search. ``reasons``: why this task
    kind, and why this output."""

    config: Config
    loaded: LoadedModel
    layout: ModelLayout
    task: PreparedTask
    task_path: Path
    reasons: tuple[str, str] = ("", "")

    def findings(self) -> list[str]:
        """What was found, in lines for a person: the task kind and metric, and the data."""
        task, name = self.task, self.config.model.name
        lines = []
        if name.endswith(".gguf") or name == BUILTIN_LLM:
            lines.append(f"model: {name} is a quantized GGUF file; its \"uncompressed\" fp32 reference is the "
                         "dequantized GGUF, not the original full-precision weights")
        lines += [f"task: {task.kind} ({self.reasons[0]}); output: {self.reasons[1]}",
                  f"metric: {task.metric} ({task.metric_reason})"]
        figures = ", ".join(f"{k} {v:.4f}" for k, v in task.reference.items())
        if task.kind == "causal-lm":
            held_out = (f"{len(task.input_ids)} held-out windows of {task.input_ids.shape[1]} tokens "
                        f"({int((task.labels >= 0).sum())} scored), {task.train_size} training windows")
        else:
            labels = f", {len(set(task.labels.tolist()))} labels" if task.labels is not None else ""
            held_out = f"{len(task.input_ids)} held-out texts{labels}, {task.train_size} training texts"
        return lines + [f"data: {held_out}; uncompressed torch model: {figures}"]


def prepare(config: Config, results: Path, phase: PhaseFactory | None = None) -> Prepared:
    """Read the data, choose the task kind, load the model, and prepare (or reuse) the scored task.
    Prints nothing: ``phase`` shows the long steps' progress (``phases_on(console)``; none by
    default), and ``Prepared.findings`` says what was found."""
    phase = phase or QUIET
    with phase(f"finding {config.model.name}"):
        source = resolve_model_source(config.model.name)  # a GGUF is dequantized once here
    data_source = default_data(config.task, source)
    data = load_texts(config.task, data_source)
    choice = choose_task(config.model, config.task, source, data)
    with phase(f"loading {config.model.name}"):
        loaded = load_model(config.model.name, classification_head=choice.needs_classification_head,
                            causal_lm=choice.needs_causal_lm)
        layout = discover_layout(loaded.module)
    with phase("running the uncompressed model over the texts (once, then cached)") as shown:
        task, task_path = prepare_task(config.model, config.task, choice, loaded, data, results / ".cache",
                                       progress=lambda done, total: shown.update(done, total))
    pooling = task.output.pooling if task.output.kind == "embedding" else config.model.pooling
    resolved = config.model_copy(update={
        "task": config.task.model_copy(update={"kind": task.kind, "metric": task.metric, "data": data_source}),
        "model": config.model.model_copy(update={"pooling": pooling}),
    })
    return Prepared(resolved, loaded, layout, task, task_path, (choice.kind_reason, choice.output_reason))


def sensitivity_guidance(prepared: Prepared, space, calibration, results: Path,
                         phase: PhaseFactory | None = None) -> tuple[Any, str]:
    """The sensitivity profile of ``space`` (measured once, cached with the task), and what it changes:
    options below ``search.quality_floor`` not offered, seed plans along its greedy path; with a
    line that says so."""
    from slimtune.search.sensitivity import PROFILE_TEXTS, cached_profile, guide, measure_profile, profile_key

    config, phase = prepared.config, phase or QUIET
    key = profile_key(prepared.loaded.source, prepared.task_path, space, PROFILE_TEXTS, config.task.seed)
    with phase("sensitivity: each choice alone, once (then cached)") as shown:
        profile, cached = cached_profile(results / ".cache", key, lambda: measure_profile(
            prepared.loaded.module, space, prepared.task, calibration, PROFILE_TEXTS, config.task.seed,
            lambda done, total: shown.update(done, total, "choices measured")))
    guidance = guide(space, profile, config.search.quality_floor, config.search.seed_plans)
    removed = "; ".join(f"{dim} {list(options)}" for dim, options in guidance.excluded) or "none"
    return guidance, (f"sensitivity: {len(profile.effects)} choices on {profile.texts} texts "
                      f"({'cached' if cached else f'{profile.seconds:.0f} s'}); below {config.search.quality_floor:.0%} "
                      f"of the uncompressed {profile.metric_name} alone, not offered: {removed}; "
                      f"{len(guidance.seeds)} seed plans")


MODES_FOLDER = Path(".work") / "kernel-modes"
"""Where, under the results folder, a machine's measured kernel modes are filed (one JSON file per
cache key): read by every later search and ``apply`` on the same machine, model, task and formats."""


@dataclass(frozen=True)
class MachineModes:
    """This machine's kernel modes for a prepared model and task: the key they are filed under
    (``kernel_modes.modes_key``), the chosen modes and every candidate mode's figures."""

    key: str
    modes: KernelModes
    figures: tuple[dict, ...]

    def record(self) -> str:
        """The modes and figures as their cache file holds them (``kernel_modes.modes_record``)."""
        from slimtune.evaluators.kernel_modes import modes_record

        return modes_record(self.modes, list(self.figures))


def machine_kernel_modes(prepared: Prepared, results: Path, phase: PhaseFactory | None = None) -> MachineModes | None:
    """The blockwise kernel modes of this machine for the prepared model and task
    (``slimtune.evaluators.kernel_modes``): measured once, on the machine as it is now (nothing
    else of slimtune's runs yet), and filed under ``results/MODES_FOLDER``; None when the space
    offers no blockwise format."""
    from slimtune.evaluators.hardware import current_target, fingerprint
    from slimtune.evaluators.kernel_modes import measured_modes, modes_key
    from slimtune.evaluators.latency import latency_inputs
    from slimtune.evaluators.node_lock import NodeLock
    from slimtune.search.shipping import inputs_fingerprints
    from slimtune.search.trial import search_bit_widths

    config, task, phase = prepared.config, prepared.task, phase or QUIET
    widths = search_bit_widths(config)
    if not widths:
        return None
    block = config.space.block_sizes[0]
    inputs = fingerprint(*inputs_fingerprints(prepared.loaded.source, prepared.task_path.read_bytes()))
    key = modes_key(current_target(), inputs, widths, block, config.latency)
    feeds = latency_inputs(task.input_ids, task.attention_mask, config.latency)
    with phase(f"{'/'.join(map(str, widths))}-bit kernel modes of this machine (once, then cached)") as shown:
        modes, figures = measured_modes(prepared.loaded.module, task, prepared.layout.linears, widths, block, feeds,
                                        config.latency, config.latency.threads, results / MODES_FOLDER / f"{key}.json",
                                        lock=NodeLock(), progress=lambda done, total, what: shown.update(done, total, what))
    return MachineModes(key, modes, tuple(figures))
