"""CompressionPlan: the shared vocabulary of slimtune.

A plan says, per module name of the original torch model, what each compression method does to
that module. One mapping per method, so each transform reads only its own. Spaces produce plans,
transforms and export consume them, MLflow stores them, and a plan rebuilds the same ONNX bytes
from the same model. Plans are frozen and JSON round-trippable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

PLAN_VERSION = 1
WEIGHT_FORMATS = ("fp32", "int8", "int4")


class PlanError(ValueError):
    """A plan that cannot be applied to a model, with the module and the reason."""


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is stored in the exported graph.

    int8: per-output-channel symmetric int8 weights run by ONNX Runtime's integer kernels
    (MatMulInteger, activations quantized on the fly). int4: blockwise 4-bit weights run by
    MatMulNBits; ``block_size`` input elements share one fp32 scale. For an embedding table,
    int8 means one fp32 scale per row (token).
    """

    format: str
    block_size: int = 32

    def __post_init__(self) -> None:
        if self.format not in WEIGHT_FORMATS:
            raise PlanError(f"unknown weight format {self.format!r}; use one of {WEIGHT_FORMATS}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise PlanError(f"int4 block size {self.block_size} must be a power of two from 16 to 256")

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "block_size": self.block_size} if self.format == "int4" else {
            "format": self.format
        }


def _frozen_mapping(items: Mapping) -> Mapping:
    return MappingProxyType(dict(sorted(items.items())))


@dataclass(frozen=True)
class CompressionPlan:
    """Per-module choices, keyed by module names of the *original* model.

    quantize:   Linear or Embedding name -> QuantSpec (absent means fp32).
    low_rank:   Linear name -> rank fraction in (0, 1) of min(in, out) after pruning; truncated SVD,
                applied only where the two factors hold fewer parameters than the matrix.
    ffn_prune:  transformer block name -> fraction in [0, 1) of FFN intermediate neurons removed.
    """

    quantize: Mapping[str, QuantSpec] = field(default_factory=dict)
    low_rank: Mapping[str, float] = field(default_factory=dict)
    ffn_prune: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, fraction in self.low_rank.items():
            if not 0.0 < fraction <= 1.0:
                raise PlanError(f"low_rank[{name!r}] = {fraction}: rank fraction must be in (0, 1]")
        for name, fraction in self.ffn_prune.items():
            if not 0.0 <= fraction < 1.0:
                raise PlanError(f"ffn_prune[{name!r}] = {fraction}: sparsity must be in [0, 1)")
        # Drop no-op entries so that equal compressions have equal plans (and equal digests).
        object.__setattr__(self, "quantize", _frozen_mapping(
            {k: v for k, v in self.quantize.items() if v.format != "fp32"}))
        object.__setattr__(self, "low_rank", _frozen_mapping({k: v for k, v in self.low_rank.items() if v < 1.0}))
        object.__setattr__(self, "ffn_prune", _frozen_mapping({k: v for k, v in self.ffn_prune.items() if v > 0.0}))

    @property
    def is_identity(self) -> bool:
        return not (self.quantize or self.low_rank or self.ffn_prune)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "quantize": {k: v.to_json() for k, v in self.quantize.items()},
            "low_rank": dict(self.low_rank),
            "ffn_prune": dict(self.ffn_prune),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)

    @property
    def digest(self) -> str:
        """Short content hash: equal plans, equal digest. Used to cache repeated proposals."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CompressionPlan:
        version = data.get("version")
        if version != PLAN_VERSION:
            raise PlanError(f"plan version {version!r} is not supported; this slimtune reads version {PLAN_VERSION}")
        unknown = set(data) - {"version", "quantize", "low_rank", "ffn_prune"}
        if unknown:
            raise PlanError(f"plan has unknown sections {sorted(unknown)}")
        return cls(
            quantize={k: QuantSpec(**v) for k, v in data.get("quantize", {}).items()},
            low_rank={k: float(v) for k, v in data.get("low_rank", {}).items()},
            ffn_prune={k: float(v) for k, v in data.get("ffn_prune", {}).items()},
        )

    @classmethod
    def loads(cls, text: str) -> CompressionPlan:
        return cls.from_json(json.loads(text))


def factor_rank(n_in: int, n_out: int, fraction: float) -> int | None:
    """Rank kept when an (n_in -> n_out) Linear is factorised at ``fraction`` of its full rank.

    None when the two factors (n_in*r + r*n_out parameters) would not be smaller than the matrix
    itself: low-rank is applied only where it removes parameters.
    """
    if fraction >= 1.0:
        return None
    rank = max(1, round(fraction * min(n_in, n_out)))
    return rank if rank * (n_in + n_out) < n_in * n_out else None


def pruned_width(width: int, sparsity: float) -> int:
    """FFN neurons kept when ``sparsity`` (a fraction) of ``width`` are removed; at least one stays."""
    return max(1, width - round(sparsity * width))
