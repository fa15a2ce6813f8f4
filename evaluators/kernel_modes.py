"""Measure the kernel modes of the blockwise formats on this hardware target, for this model.

For each bit width the space offers (4, 2), the model with every Linear at that width (round to
nearest, the space's first block size) is built once with zero points and once symmetric. Each
build's blockwise kernels are timed at accuracy level 0 and 4 (the level set on the graph in
memory) in ``blockwise_probe``'s graph, which holds them alone: the exact mode first, a mode whose
first runs are all no faster stops there (``latency.EARLY_RUNS``). The modes are then scored, on
the whole builds, by the task's metric on a fixed sample of the held-out texts, fastest first, only
as far as the choice needs. ``EXACT`` (level 0, zero points) is the reference; a mode holds
quality when its metric is no worse than the reference's by more than ``tolerance`` (a fraction of
the reference's value); the fastest mode that holds it is kept, so a mode slower than the exact
one is never scored, and the scoring stops at the first faster mode that holds. A mode ONNX
Runtime refuses on this machine is left out. Units: ms (latency of the probe), the metric's own.

Measured once per hardware target, model and task, formats and latency settings (the cache key):
a local search measures them before its trials, on the quiet machine, and files them with the
machine's other measurements, so later searches and ``apply`` read them; a cluster's nodes measure
their own once per search, by one worker at a time (the others wait for its result), the timings
holding the node's lock exclusively and the builds and the scoring holding it shared, so other
trials go on building meanwhile.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from slimtune.config import FORMAT_OF_BITS, METRIC_GOALS, LatencyConfig
from slimtune.errors import first_line
from slimtune.evaluators import as_dict
from slimtune.evaluators.hardware import HardwareTarget, fingerprint
from slimtune.evaluators.latency import measure_latency
from slimtune.evaluators.node_lock import NodeLock, exclusive_file
from slimtune.evaluators.quality import StagedQuality
from slimtune.export import build_artifact
from slimtune.export.modes import EXACT, KernelModes
from slimtune.files import write_atomically
from slimtune.plan import CompressionPlan, QuantSpec
from slimtune.tasks import PreparedTask

MODE_TOLERANCE = 0.01  # a mode may cost at most 1% of the exact mode's metric (perplexity +1%, accuracy -1%)
SAMPLE_TEXTS = 32
COMPUTE_BOUND_ROWS = 64
"""Activation rows from which a blockwise kernel is bound by compute, not by reading its weights:
each 4-bit weight byte then takes 4 x rows = 256 or more flops, above the flops per byte of memory
bandwidth of CPUs (tens; fewer on an AVX2-only CPU, whose peak flops are lower). Below it (a causal LM's generated token: one row) the kernels run as fast
as their weights stream from memory, which one layer's weights, small enough to stay in cache,
would not show: SmolLM2's decode kernels timed 0.1-0.2 ms per token for one layer, level 4 at
0.53-0.63x of level 0, against 0.75-0.80x in the whole build (2-core Xeon, avx512_vnni amx_int8)."""
CANDIDATES = ((0, False), (4, False), (0, True), (4, True))  # (accuracy level, symmetric); the first is exact



@dataclass(frozen=True)
class ModeFigures:
    """One measured mode of one bit width: its metric on the sample and its latency (ms).
    ``metric`` is NaN for a mode the choice did not need scored (slower than a mode that holds)."""

    bits: int
    level: int
    symmetric: bool
    metric: float
    latency_ms: float
    error: str = ""

    @property
    def mode(self) -> tuple[int, bool]:
        return self.level, self.symmetric

    def as_dict(self) -> dict:
        """Plain JSON: a figure not measured (not scored, or refused) is null."""
        return {"bits": self.bits, "level": self.level, "symmetric": self.symmetric, "metric": _or_null(self.metric),
                "latency_ms": _or_null(self.latency_ms), "error": self.error}


def _or_null(value: float) -> float | None:
    return None if math.isnan(value) else value


def with_level(built: onnx.ModelProto, level: int) -> bytes:
    """``built``'s bytes with every MatMulNBits node at accuracy ``level`` (0: the attribute left out)."""
    model = onnx.ModelProto()
    model.CopyFrom(built)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + ([helper.make_attribute("accuracy_level", level)] if level else []))
    return model.SerializeToString()


def blockwise_probe(built: onnx.ModelProto, rows: int, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The blockwise kernels (MatMulNBits) of ``built`` alone, in their smallest repeating unit, and
    inputs for them: what the kernel modes are timed on.

    The modes change how these kernels run and nothing else: attention, norms and the fp32 MatMuls
    take the same time in every mode and would only dilute the difference a timing must resolve.
    On a 2-core Intel Xeon (avx512_vnni amx_int8) the default model's whole measurement took
    6.8-7.6 s timing the whole builds and 3.3-3.4 s timing this probe, the same modes chosen in all
    six runs (level 4 1.16-1.20x slower than level 0 in the whole build, 1.25-1.28x in the probe).
    The probe is timed on the machine at hand like the builds were, so a CPU without AVX-512 or
    VNNI, where level 4's int8 path ranks differently, gets its own ranking.
    From ``COMPUTE_BOUND_ROWS`` rows on, the unit keeps each distinct kernel (K, N, bits, block
    size) as many times as the graph has it, divided by the greatest common divisor of those counts:
    one layer of a uniform stack, so the kernels weigh as they do in the model; a kernel that occurs
    once (an LM head) keeps them all. Fewer rows keep every kernel (below).
    Each kernel reads ``rows`` activation rows of its width K (the search's latency shape: an
    encoder's batch x sequence tokens; 1 for a causal LM, whose latency is a generated token),
    seeded normal values in the graph's float type."""
    nodes = [n for n in built.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        raise ValueError("the build has no MatMulNBits kernels to time")
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    shape = [(a["K"], a["N"], a["bits"], a["block_size"]) for a in attrs]
    counts = Counter(shape)
    unit = math.gcd(*counts.values()) if rows >= COMPUTE_BOUND_ROWS else 1
    kept, taken = [], Counter()
    for node, key in zip(nodes, shape, strict=True):
        if taken[key] < counts[key] // unit:
            taken[key] += 1
            kept.append((node, key[0]))
    inits = {i.name: i for i in built.graph.initializer}
    float_type = inits[kept[0][0].input[2]].data_type  # the scales: MatMulNBits' activation type
    widths = sorted({k for _, k in kept})
    probe_nodes, outputs = [], []
    for i, (node, k) in enumerate(kept):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[0], copy.output[0] = f"x{k}", f"y{i}"
        del copy.output[1:]
        probe_nodes.append(copy)
        outputs.append(helper.make_tensor_value_info(f"y{i}", float_type, None))
    weights = [inits[name] for node, _ in kept for name in node.input[1:] if name in inits]
    graph = helper.make_graph(probe_nodes, "blockwise_probe",
                              [helper.make_tensor_value_info(f"x{k}", float_type, [rows, k]) for k in widths],
                              outputs, initializer=weights)
    probe = helper.make_model(graph, opset_imports=list(built.opset_import), ir_version=built.ir_version)
    rng = np.random.default_rng(seed)
    dtype = helper.tensor_dtype_to_np_dtype(float_type)
    return probe, {f"x{k}": rng.standard_normal((rows, k)).astype(dtype) for k in widths}


def _holds(candidate: float, exact: float, goal: str, tolerance: float) -> bool:
    allowed = tolerance * abs(exact)
    return candidate >= exact - allowed if goal == "max" else candidate <= exact + allowed


def choose_modes(figures: list[ModeFigures], goal: str, tolerance: float = MODE_TOLERANCE) -> KernelModes:
    """The fastest mode of each bit width whose metric stays within ``tolerance`` of the exact mode's
    (the exact mode holds by definition, scored or not)."""
    levels, symmetric = [], []
    for bits in sorted({f.bits for f in figures}):
        measured = sorted((f for f in figures if f.bits == bits and not f.error), key=lambda f: f.latency_ms)
        exact = next((f for f in measured if f.mode == CANDIDATES[0]), None)
        if exact is None:
            continue
        best = next(f for f in measured if f is exact or (not math.isnan(f.metric) and not math.isnan(exact.metric)
                                                           and _holds(f.metric, exact.metric, goal, tolerance)))
        if best.level:
            levels.append((bits, best.level))
        if best.symmetric:
            symmetric.append(bits)
    return KernelModes(levels=tuple(levels), symmetric=tuple(symmetric))


STEPS_PER_WIDTH = 2 + len(CANDIDATES) + 1
"""Progress steps of one bit width: its two builds, its candidates' timings, and its scoring."""
ModesProgress = Callable[[int, int, str], None]
"""(steps done, steps in all, what was just done): the measurement's progress, for a display."""


def measure_modes(model, task: PreparedTask, linears: tuple[str, ...], bit_widths: tuple[int, ...], block: int,
                  feeds: dict, latency: LatencyConfig, threads: int, work: Path, tolerance: float = MODE_TOLERANCE,
                  lock: NodeLock | None = None, progress: ModesProgress | None = None) -> list[ModeFigures]:
    """Every candidate mode of every blockwise bit width timed, and scored as far as the choice
    needs (module docstring); builds in ``work``. ``lock``: held shared while building and
    scoring, exclusively while timing. ``progress`` hears of each build, timing and scoring
    (``STEPS_PER_WIDTH`` per bit width): a large model's builds take a while."""
    sample = task.sample_rows(min(SAMPLE_TEXTS, len(task.input_ids)), seed=0)
    rows = 1 if task.output.kind == "lm" else int(np.asarray(feeds["input_ids"]).size)
    shared = lock.shared if lock is not None else nullcontext
    goal = METRIC_GOALS[task.metric]
    figures = []
    steps, done = STEPS_PER_WIDTH * len(bit_widths), 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps, what)

    work.mkdir(parents=True, exist_ok=True)
    for bits in bit_widths:
        plan = CompressionPlan(quantize={name: QuantSpec(FORMAT_OF_BITS[bits], block) for name in linears})
        built, probes, timed, refused = {}, {}, [], []
        for symmetric in (False, True):
            path = build_artifact(model, plan, work / f"{bits}-{symmetric}.onnx", output=task.output, hold=shared,
                                  modes=KernelModes(symmetric=(bits,) if symmetric else ())).path
            with shared():  # reading and copying whole graphs is heavy work too: not while a trial times
                built[symmetric] = onnx.load(str(path))
                probes[symmetric] = blockwise_probe(built[symmetric], rows)
            path.unlink()
            step(f"{bits}-bit {'symmetric' if symmetric else 'with zero points'} built")
        for level, symmetric in CANDIDATES:
            exact = next((f.latency_ms for f in timed if f.mode == CANDIDATES[0]), None)
            try:
                probe, probe_feeds = probes[symmetric]
                with shared():
                    graph = with_level(probe, level)
                # a mode no faster than the exact one is never chosen: its first runs say so
                ms = as_dict(measure_latency(graph, probe_feeds, latency, lock, slower_than=exact))["latency_ms"]
                timed.append(ModeFigures(bits, level, symmetric, float("nan"), ms))
            except Exception as exc:  # noqa: BLE001 - a mode this runtime refuses is left out, with why
                refused.append(ModeFigures(bits, level, symmetric, float("nan"), float("nan"), first_line(exc)))
            step(f"{bits}-bit level {level}{' sym' if symmetric else ''} timed")
        scored = _scored_as_needed(timed, built, task, sample, threads, goal, tolerance, shared)
        step(f"{bits}-bit modes scored as far as the choice needs")
        figures += sorted(scored + refused, key=lambda f: CANDIDATES.index(f.mode))
    return figures


def _scored_as_needed(timed: list[ModeFigures], built: dict[bool, onnx.ModelProto], task: PreparedTask,
                      sample, threads: int, goal: str, tolerance: float, shared) -> list[ModeFigures]:
    """``timed`` (one bit width) with metrics: the exact mode's and the faster modes', fastest first,
    up to the first that holds; nothing when the exact mode is the fastest."""

    def score(f: ModeFigures) -> ModeFigures:
        with shared():
            graph = with_level(built[f.symmetric], f.level)
        try:
            metric = as_dict(StagedQuality(graph, task, threads, sample, hold=shared).first_stage())[task.metric]
        except Exception as exc:  # noqa: BLE001 - timed but refused on the texts: left out, with why
            return ModeFigures(f.bits, f.level, f.symmetric, float("nan"), float("nan"), first_line(exc))
        return ModeFigures(f.bits, f.level, f.symmetric, metric, f.latency_ms)

    exact = next((f for f in timed if f.mode == CANDIDATES[0]), None)
    if exact is None:
        return timed
    faster = sorted((f for f in timed if f.latency_ms < exact.latency_ms), key=lambda f: f.latency_ms)
    if not faster:
        return timed
    done = {exact.mode: score(exact)}
    reference = done[exact.mode]
    for f in faster:
        done[f.mode] = score(f)
        if reference.error or (not done[f.mode].error and _holds(done[f.mode].metric, reference.metric, goal, tolerance)):
            break
    return [done.get(f.mode, f) for f in timed]


def modes_key(hardware: HardwareTarget, inputs_fingerprint: str, bit_widths: tuple[int, ...], block: int,
              latency: LatencyConfig) -> str:
    """The cache key of a node's measured modes: the hardware target, the model and task
    (``inputs_fingerprint``), the formats and the latency settings. Not the build threads (front
    recovery builds with more): the modes are timed at the latency's threads."""
    return fingerprint(hardware.key, inputs_fingerprint, str(bit_widths), str(block), latency.model_dump_json())


def modes_record(modes: KernelModes, figures: list[dict]) -> str:
    """The chosen modes and every candidate's figures as one JSON text (a cache file's content)."""
    return json.dumps({"modes": modes.dumps(), "figures": figures}, indent=1)


def read_modes_record(text: str) -> tuple[KernelModes, list[dict]]:
    """(modes, figures) of a ``modes_record``."""
    data = json.loads(text)
    return KernelModes.loads(data["modes"]), data["figures"]


def cached_modes(cache: Path, measure) -> tuple[KernelModes, list[dict]]:
    """(modes, figures) from ``cache`` when it exists, else from ``measure()`` -> (modes, figures),
    written atomically to ``cache``. One process measures at a time: the others wait and read its result."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_file(cache.with_name(cache.name + ".lock")):
        if cache.is_file():
            return read_modes_record(cache.read_text())
        modes, figures = measure()
        write_atomically(cache, modes_record(modes, figures))
    return modes, figures


def measured_modes(model, task: PreparedTask, linears: tuple[str, ...], bit_widths: tuple[int, ...], block: int,
                   feeds: dict, latency: LatencyConfig, threads: int, cache: Path,
                   tolerance: float = MODE_TOLERANCE, lock: NodeLock | None = None,
                   progress: ModesProgress | None = None) -> tuple[KernelModes, list[dict]]:
    """The chosen modes and every mode's figures, from ``cache`` or measured (``measure_modes``,
    under ``lock`` as it says, telling ``progress``)."""
    if not bit_widths:
        return EXACT, []

    def measure():
        work = cache.with_name(cache.stem + ".work")
        try:
            figures = measure_modes(model, task, linears, bit_widths, block, feeds, latency, threads, work,
                                    tolerance, lock, progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return choose_modes(figures, METRIC_GOALS[task.metric], tolerance), [f.as_dict() for f in figures]

    return cached_modes(cache, measure)
