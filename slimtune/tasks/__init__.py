"""Task kinds: how a candidate is scored. One module per kind, one dispatch dict.

Each kind prepares its data once (``prepare``: split, tokens, the uncompressed model's outputs, a
cached ``PreparedTask``) and scores an artifact's outputs on the held-out texts into named metrics
with units (``score``). ``evaluators/`` runs the artifact and calls the kind; never the other way.
The search optimises one of the kind's metrics (``PreparedTask.metric``) and logs all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from slimtune.config import BUILTIN_DATA, BUILTIN_TEXT, TASK_METRICS, ModelConfig, TaskConfig
from slimtune.model import (
    LoadedModel,
    ModelLoadError,
    OutputSpec,
    has_classification_head,
    is_causal_lm,
    model_config,
    sentence_transformers_pooling,
    source_fingerprint,
)
from slimtune.tasks import causal_lm, classifier, embedding_head, fidelity
from slimtune.tasks.base import Metric, PreparedTask, Progress, Run, run_batches
from slimtune.tasks.data import DataError, TextData, choose_classification_metric, load_texts

KINDS: dict[str, ModuleType] = {"classifier": classifier, "embedding-head": embedding_head,
                                "embedding-fidelity": fidelity, "causal-lm": causal_lm}
# Kinds whose raw outputs are too large to keep: each run's outputs are reduced before they are stacked.
RUN_REDUCERS: dict[str, Callable[[Run], Run]] = {"causal-lm": causal_lm.reduced_run}
_CACHE_FORMAT = 6  # bump when PreparedTask gains or changes fields


@dataclass(frozen=True)
class TaskChoice:
    """The resolved way a search scores candidates, each choice with the reason it was made."""

    kind: str
    kind_reason: str
    output: OutputSpec
    output_reason: str

    @property
    def needs_classification_head(self) -> bool:
        return self.kind == "classifier"

    @property
    def needs_causal_lm(self) -> bool:
        return self.kind == "causal-lm"


def default_data(cfg: TaskConfig, source: str) -> str:
    """``task.data``, else the kind's built-in texts: Python's documentation topics for a causal
    language model (set as ``task.kind`` or found in the model's config), BBC News otherwise."""
    if cfg.data is not None:
        return cfg.data
    causal = cfg.kind == "causal-lm" or (cfg.kind is None and is_causal_lm(model_config(source)))
    return BUILTIN_TEXT if causal else BUILTIN_DATA


def detect_kind(cfg: TaskConfig, source: str, data: TextData) -> tuple[str, str]:
    """(kind, why): ``task.kind`` when set; else from the model's head, then from the data's labels."""
    config = model_config(source)
    architectures = config.architectures or []
    head = has_classification_head(config)
    if cfg.kind == "causal-lm" and not is_causal_lm(config):
        raise ModelLoadError(f"task.kind is causal-lm but the model is not a causal language model (architectures "
                             f"{architectures}): load a ...ForCausalLM model or choose another task.kind")
    if cfg.kind is not None:
        if cfg.kind == "classifier" and not head:
            raise ModelLoadError(f"task.kind is classifier but the model has no sequence-classification head "
                                 f"(architectures {architectures}): load a fine-tuned classifier or set "
                                 "task.kind to embedding-head or embedding-fidelity")
        return cfg.kind, "set by task.kind"
    if is_causal_lm(config):
        return "causal-lm", f"the model is a causal language model ({', '.join(architectures)})"
    if head:
        return "classifier", f"the model has a sequence-classification head ({', '.join(architectures)})"
    if data.labels is not None:
        return "embedding-head", f"the model has no classification head and the data has labels ({cfg.label_column!r})"
    return "embedding-fidelity", f"the model has no classification head and the data no label column ({cfg.label_column!r})"


def choose_output(kind: str, model_cfg: ModelConfig, source: str) -> tuple[OutputSpec, str]:
    """(output, why): logits for a classifier; otherwise the pooling of ``model.pooling``, of the
    model's sentence-transformers config, or mean."""
    if kind == "classifier":
        return OutputSpec("logits"), "the model's own classification head"
    if kind == "causal-lm":
        return OutputSpec("lm"), "next-token logits with a KV cache for generation"
    if model_cfg.pooling is not None:
        return OutputSpec("embedding", model_cfg.pooling), f"{model_cfg.pooling} pooling, set by model.pooling"
    shipped = sentence_transformers_pooling(source)
    if shipped is not None:
        return OutputSpec("embedding", shipped), f"{shipped} pooling, from the model's sentence-transformers config"
    return OutputSpec("embedding", "mean"), "mean pooling (the model ships no pooling config)"


def choose_task(model_cfg: ModelConfig, cfg: TaskConfig, source: str, data: TextData) -> TaskChoice:
    kind, kind_reason = detect_kind(cfg, source, data)
    output, output_reason = choose_output(kind, model_cfg, source)
    return TaskChoice(kind, kind_reason, output, output_reason)


def choose_metric(kind: str, cfg: TaskConfig, data: TextData) -> tuple[str, str]:
    """(metric, why): ``task.metric`` when set, else by the kind and the balance of the labels."""
    if cfg.metric is not None:
        if cfg.metric not in TASK_METRICS[kind]:
            raise DataError(f"task.metric {cfg.metric!r} is not measured by task kind {kind!r}: "
                            f"choose one of {list(TASK_METRICS[kind])}")
        return cfg.metric, "set by task.metric"
    if kind == "embedding-fidelity":
        return "top10_overlap", "retrieval agreement with the uncompressed model (no labels)"
    if kind == "causal-lm":
        return "perplexity", "how well the model predicts held-out text"
    if data.labels is None:
        return "accuracy", "no labels to weigh"  # the kind's own check names the missing column
    return choose_classification_metric(data.labels)


def task_cache_key(model_cfg: ModelConfig, task_cfg: TaskConfig, choice: TaskChoice, source: str,
                   data: TextData) -> str:
    """Everything that determines the prepared task: format, settings, resolved choices, model, texts."""
    payload = json.dumps([_CACHE_FORMAT, model_cfg.model_dump(), task_cfg.model_dump(),
                          dataclasses.asdict(choice.output), choice.kind, source_fingerprint(source)], sort_keys=True)
    digest = hashlib.sha256(payload.encode())
    for index, text in enumerate(data.texts):
        digest.update(text.encode("utf-8", "replace"))
        digest.update((data.labels[index] if data.labels is not None else "").encode())
    return digest.hexdigest()[:16]


def prepare_task(model_cfg: ModelConfig, task_cfg: TaskConfig, choice: TaskChoice, loaded: LoadedModel,
                 data: TextData, cache_dir: Path, progress: Progress | None = None) -> tuple[PreparedTask, Path]:
    """Prepare the task of ``choice.kind`` once; reuse the cached result when nothing changed."""
    metric, reason = choose_metric(choice.kind, task_cfg, data)
    path = cache_dir / f"task-{task_cache_key(model_cfg, task_cfg, choice, loaded.source, data)}.npz"
    if path.is_file():
        return PreparedTask.load(path), path
    task = KINDS[choice.kind].prepare(loaded, choice.output, model_cfg.max_length, task_cfg, data, metric, reason,
                                      progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    task.save(path)
    return task, path


def scoring_run(kind: str, run: Run) -> Run:
    """``run`` as the kind scores it: reduced right after each run where the raw outputs are too large
    to keep (``RUN_REDUCERS``), unchanged otherwise."""
    reducer = RUN_REDUCERS.get(kind)
    return reducer(run) if reducer is not None else run


def score_task(task: PreparedTask, run: Run) -> tuple[Metric, ...]:
    """The kind's metrics of whatever ``run`` computes (an ONNX Runtime session, a torch model)."""
    return KINDS[task.kind].score(task, run_batches(scoring_run(task.kind, run), task.input_ids, task.attention_mask))


__all__ = ["KINDS", "DataError", "Metric", "PreparedTask", "TaskChoice", "TextData", "choose_task", "default_data",
           "load_texts", "prepare_task", "score_task", "scoring_run"]
