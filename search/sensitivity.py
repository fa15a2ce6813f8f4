"""Per-layer sensitivity: each choice of the space applied alone, scored once before the search.

For every open dimension of the space and every option of it that compresses, the uncompressed
model with only that choice applied is scored on a seeded sample of held-out texts, by the task's
own metric (and the cosine of its outputs to the uncompressed model's, a finer tie-breaker). This
runs in torch, not ONNX Runtime, to stay cheap (seconds per choice): structural choices through the
real transforms, weight formats as their rounding (int8 per output channel, 4/2-bit per block,
round-to-nearest), activations unquantized. It is a guide for the sampler, never a reported figure.

What it is used for (``search.sensitivity``):
- narrowing: an option that alone keeps less than ``search.quality_floor`` of the uncompressed
  model's metric is not offered: every plan holding it is at least that bad;
- seeding: ``greedy_path`` adds choices from the least to the most harmful, and plans spread along
  it (from uniform int8, adding structural choices and embedding formats) are enqueued after fp32
  and uniform int8 (``seed_plans``), as starting points the sampler evolves from;
- the greedy baseline of the search-methods benchmark measures the same path.

The profile is cached next to the prepared task, keyed by the task file, the model and the space.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtune.config import METRIC_GOALS
from slimtune.evaluators.hardware import fingerprint
from slimtune.files import write_atomically
from slimtune.model import wrap_output
from slimtune.plan import CompressionPlan
from slimtune.spaces import SearchSpace
from slimtune.spaces.dimensions import LOWER_COMPRESSES, UNCOMPRESSED, is_layer_bits, knob
from slimtune.tasks import KINDS, PreparedTask, scoring_run
from slimtune.tasks.base import run_batches, torch_run
from slimtune.transforms import Calibration, apply_structural

PROFILE_TEXTS = 32  # held-out texts each choice is scored on: enough to rank choices and catch ruinous ones


@dataclass(frozen=True)
class ChoiceEffect:
    """One option of one dimension, applied alone: the task metric on the profile's texts, and the
    mean cosine of the outputs to the uncompressed model's (1.0: identical)."""

    dimension: str
    option: Any
    metric: float
    cosine: float


@dataclass(frozen=True)
class SensitivityProfile:
    metric_name: str
    baseline: float  # the uncompressed model's metric on the profile's texts
    effects: tuple[ChoiceEffect, ...]
    texts: int
    seconds: float

    def loss(self, effect: ChoiceEffect) -> float:
        """How much worse than the uncompressed model the choice alone is (in the metric's units, >= 0 worse)."""
        sign = 1.0 if METRIC_GOALS[self.metric_name] == "max" else -1.0
        return sign * (self.baseline - effect.metric)

    def kept_fraction(self, effect: ChoiceEffect) -> float:
        """The share of the uncompressed model's metric the choice alone keeps (its inverse for a minimised one)."""
        if METRIC_GOALS[self.metric_name] == "max":
            return effect.metric / self.baseline if self.baseline else 1.0
        return self.baseline / effect.metric if effect.metric else 1.0

    def excluded(self, quality_floor: float) -> dict[str, tuple[Any, ...]]:
        """Options that alone fall below ``quality_floor`` of the uncompressed model's metric."""
        out: dict[str, list[Any]] = {}
        for effect in self.effects:
            if self.kept_fraction(effect) < quality_floor:
                out.setdefault(effect.dimension, []).append(effect.option)
        return {dim: tuple(options) for dim, options in out.items()}

    def ranked(self) -> list[ChoiceEffect]:
        """Choices from the least to the most harmful (metric first, then output cosine)."""
        return sorted(self.effects, key=lambda e: (round(self.loss(e), 9), -e.cosine))

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "effects": [asdict(e) for e in self.effects]})

    @classmethod
    def from_json(cls, text: str) -> SensitivityProfile:
        raw = json.loads(text)
        return cls(**{**raw, "effects": tuple(ChoiceEffect(**e) for e in raw["effects"])})


def fp32_choices(space: SearchSpace) -> dict[str, Any]:
    """The open dimensions' uncompressed options: fp32 weights, nothing removed, full rank."""
    return {dim: UNCOMPRESSED.get(knob(dim), options[0])
            for dim, options in space.dimensions().items() if len(options) > 1}


def compressing_options(space: SearchSpace) -> list[tuple[str, Any]]:
    """(dimension, option) pairs that compress on their own: a format below 32 bits, a removed
    fraction above 0, a rank below 1, blocks dropped. Block sizes and methods only shape a format."""
    base = fp32_choices(space)
    pairs = []
    for dim, options in space.dimensions().items():
        if dim not in base or knob(dim) not in UNCOMPRESSED:
            continue
        pairs += [(dim, option) for option in options if option != base[dim]]
    return pairs


def _round_weight(weight: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Round-to-nearest of a (out, in) weight: int8 per output channel (symmetric), 4/2-bit per
    block of ``block`` input elements (asymmetric), as the exported graph stores them."""
    if bits >= 32:
        return weight
    if bits == 8:
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        return (weight / scale).round().clamp(-127, 127) * scale
    rows, cols = weight.shape
    pad = (-cols) % block
    w = torch.nn.functional.pad(weight, (0, pad)).reshape(rows, -1, block)
    low, high = w.amin(dim=2, keepdim=True), w.amax(dim=2, keepdim=True)
    levels = 2 ** bits - 1
    scale = (high - low).clamp_min(1e-12) / levels
    rounded = ((w - low) / scale).round().clamp(0, levels) * scale + low
    return rounded.reshape(rows, -1)[:, :cols]


@torch.no_grad()
def rounded_model(model: nn.Module, plan: CompressionPlan, calibration: Calibration | None) -> nn.Module:
    """``model`` transformed by the plan's structural part, its planned weights rounded to their format."""
    out = apply_structural(model, plan, calibration)
    names = dict(out.named_modules())
    for name, spec in plan.quantize.items():
        module = names.get(name)
        if spec.format == "fp32" or not isinstance(module, nn.Linear | nn.Embedding):
            continue
        # (out, in) for a Linear; (tokens, hidden) for a table, whose rows are scaled like output channels
        module.weight.data = _round_weight(module.weight.data, spec.bits, spec.block_size)
    return out


def _score(model: nn.Module, task: PreparedTask) -> tuple[float, np.ndarray]:
    outputs = run_batches(scoring_run(task.kind, torch_run(wrap_output(model, task.output).eval())), task.input_ids,
                          task.attention_mask)
    metric = {m.name: m.value for m in KINDS[task.kind].score(task, outputs)}[task.metric]
    return metric, outputs


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)  # one vector per text (a window's per-token figures)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def measure_profile(model: nn.Module, space: SearchSpace, task: PreparedTask, calibration: Calibration | None,
                    texts: int = PROFILE_TEXTS, seed: int = 0, progress=None) -> SensitivityProfile:
    """Score every compressing option alone (``compressing_options``) on ``texts`` held-out texts."""
    started = time.perf_counter()
    subset = task.held_out_rows(task.sample_rows(texts, seed))
    base_choices = fp32_choices(space)
    baseline, reference = _score(model, subset)
    pairs = compressing_options(space)
    effects = []
    for index, (dim, option) in enumerate(pairs):
        plan = space.plan_from_choices({**base_choices, dim: option})
        metric, outputs = _score(rounded_model(model, plan, calibration), subset)
        effects.append(ChoiceEffect(dim, option, float(metric), _cosine(outputs, reference)))
        if progress:
            progress(index + 1, len(pairs))
    return SensitivityProfile(task.metric, float(baseline), tuple(effects), len(subset.input_ids),
                              time.perf_counter() - started)


def profile_key(model_source: str, task_path: Path, space: SearchSpace, texts: int, seed: int) -> str:
    """Everything a profile depends on: the model's files, the prepared task's bytes, the space's choices."""
    from slimtune.search.shipping import inputs_fingerprints

    dims = json.dumps({k: list(v) for k, v in space.dimensions().items()}, sort_keys=True, default=str)
    return fingerprint(*inputs_fingerprints(model_source, Path(task_path).read_bytes()), dims, str(texts), str(seed),
                       "profile-v1")


def cached_profile(cache_dir: Path, key: str, measure) -> tuple[SensitivityProfile, bool]:
    """The profile cached under ``key`` in ``cache_dir``, or ``measure()`` written there; (profile, was cached)."""
    path = Path(cache_dir) / f"profile-{key}.json"
    if path.is_file():
        return SensitivityProfile.from_json(path.read_text()), True
    profile = measure()
    write_atomically(path, profile.to_json())
    return profile, False


def greedy_path(profile: SensitivityProfile, space: SearchSpace, quality_floor: float = 0.0,
                start: dict[str, Any] | None = None, fixed: frozenset[str] = frozenset()) -> list[tuple[dict[str, Any], float]]:
    """Choices taken one at a time from the least harmful on, each replacing the dimension's earlier
    choice only when it compresses more: one (params of the open dimensions, summed solo losses)
    per step, from ``start`` (default: the uncompressed model). Options below ``quality_floor`` and
    the ``fixed`` dimensions are skipped.
    """
    choices = {**fp32_choices(space), **(start or {})}
    losses: dict[str, float] = {}
    path = []
    for effect in profile.ranked():
        if (profile.kept_fraction(effect) < quality_floor or effect.dimension not in choices
                or effect.dimension in fixed):
            continue
        if _compression_rank(effect.dimension, effect.option) <= _compression_rank(effect.dimension,
                                                                                   choices[effect.dimension]):
            continue
        choices = {**choices, effect.dimension: effect.option}
        losses[effect.dimension] = max(0.0, profile.loss(effect))
        path.append((dict(choices), sum(losses.values())))
    return path


def _compression_rank(dim: str, option: Any) -> float:
    """Higher compresses more: fewer bits, a lower rank, a larger removed fraction, more blocks dropped."""
    return -float(option) if knob(dim) in LOWER_COMPRESSES else float(option)


def seed_plans(path: list[tuple[dict[str, Any], float]], count: int) -> list[dict[str, Any]]:
    """``count`` plans along the greedy path at 1/2^(count-1), ..., 1/4, 1/2 and all of its length: dense
    where it is mild (near the uncompressed figures, where a front is most often read), from the
    mildest to the most compressed."""
    if count <= 0 or not path:
        return []
    picks = sorted({max(0, math.ceil(len(path) / 2 ** (count - 1 - i)) - 1) for i in range(count)})
    return [path[i][0] for i in picks]


@dataclass(frozen=True)
class Guidance:
    """What the profile changes in a search: the narrowed space, the options it removed, the seeds."""

    space: SearchSpace
    excluded: tuple[tuple[str, tuple[Any, ...]], ...]
    seeds: dict[str, dict[str, Any]]


def guide(space: SearchSpace, profile: SensitivityProfile, quality_floor: float, seed_count: int) -> Guidance:
    """Narrow ``space`` by ``quality_floor`` and pick ``seed_count`` plans along the greedy path from
    uniform 4-bit (language models; with the first of the space's 4-bit methods) or uniform int8
    (named ``sensitivity-1`` ...), leaving out those equal to a reference point."""
    import dataclasses

    # The uniform references every front is read against are always measured: their options stay on
    # offer, whatever the profile says (the int8 + FFN starting points may be narrowed away).
    needed: dict[str, set[Any]] = {}
    uniform = ("fp32", "uniform-int8", "uniform-int4")
    for params in (p for name, p in space.reference_points().items() if name in uniform):
        for dim, value in params.items():
            needed.setdefault(dim, set()).add(value)
    excluded = {dim: kept for dim, options in profile.excluded(quality_floor).items()
                if (kept := tuple(o for o in options if o not in needed.get(dim, ())))}
    narrowed = dataclasses.replace(space, excluded={**space.excluded, **excluded})
    dims = narrowed.dimensions()
    open_dims = {dim for dim, options in dims.items() if len(options) > 1}
    reference_points = narrowed.reference_points()
    references = list(reference_points.values())
    # Seeds build on a uniform reference (a format every search measures first) and add the profile's
    # structural choices and embedding formats; the sampler explores the layers' formats. The base is
    # uniform 4-bit for a language model (its one-command format, weight-only: int8's on-the-fly
    # activation quantization, which the profile does not model, costs LMs perplexity), else int8.
    start = reference_points.get("uniform-int4", reference_points.get("uniform-int8"))
    if start is not None and "int4.method" in open_dims:
        # The reference quantizes in one command (round to nearest); seeds take the space's first method.
        start = {**start, "int4.method": dims["int4.method"][0]}
    fixed = frozenset(d for d in dims if is_layer_bits(d)) if start else frozenset()
    seeds: dict[str, dict[str, Any]] = {}
    for params in seed_plans(greedy_path(profile, narrowed, quality_floor, start, fixed), seed_count):
        params = {k: v for k, v in params.items() if k in open_dims}
        if params not in references and params not in seeds.values():
            seeds[f"sensitivity-{len(seeds) + 1}"] = params
    return Guidance(narrowed, tuple(sorted(excluded.items())), seeds)
