"""CompressionPlan: the shared vocabulary of slimtune.

A plan says, per module name of the original torch model, what each compression method does to
that module. One mapping per method, so each transform reads only its own. Spaces produce plans,
transforms and export consume them, MLflow stores them, and a plan rebuilds the same ONNX bytes
from the same model. Plans are frozen and JSON round-trippable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from slimtune.config import (
    BLOCK_SIZES,
    BLOCKWISE_FORMATS,
    LOW_RANK_METHODS,
    QUANT_METHODS,
    WEIGHT_FORMAT_BITS,
)

PLAN_VERSION = 2
WEIGHT_FORMATS = tuple(WEIGHT_FORMAT_BITS)


class PlanError(ValueError):
    """A plan that cannot be applied to a model, with the module and the reason."""


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is stored in the exported graph.

    int8: per-output-channel symmetric int8 weights run by ONNX Runtime's integer kernels
    (MatMulInteger, activations quantized on the fly). int4 / int2: blockwise weights run by
    MatMulNBits; ``block_size`` input elements share one fp32 scale; ``method`` is how the
    low-bit values are chosen: round-to-nearest (``rtn``), GPTQ with calibration inputs from the
    task (``gptq``), half-quadratic optimisation of scales and zero points (``hqq``), or the
    weights' own 4-bit grid kept exactly (``grid``: a model dequantized from a 4-bit GGUF; see
    ``slimtune.export.grid``; off-grid weights are rounded to nearest). For an
    embedding table, int8 means one fp32 scale per row (token) and int4 a block-quantized table
    read by ``GatherBlockQuantized``.
    """

    format: str
    block_size: int = 32
    method: str = "rtn"

    def __post_init__(self) -> None:
        if self.format not in WEIGHT_FORMATS:
            raise PlanError(f"unknown weight format {self.format!r}; use one of {WEIGHT_FORMATS}")
        if self.block_size not in BLOCK_SIZES:
            raise PlanError(f"block size {self.block_size} must be a power of two from 16 to 256")
        if self.method not in QUANT_METHODS:
            raise PlanError(f"unknown quantization method {self.method!r}; use one of {QUANT_METHODS}")
        if not self.is_blockwise:  # block size and method mean nothing for fp32 / int8: normalise them away
            object.__setattr__(self, "block_size", 32)
            object.__setattr__(self, "method", "rtn")

    @property
    def is_blockwise(self) -> bool:
        return self.format in BLOCKWISE_FORMATS

    @property
    def bits(self) -> int:
        """Bits per stored weight (scales aside)."""
        return WEIGHT_FORMAT_BITS[self.format]

    def to_json(self) -> dict[str, Any]:
        if not self.is_blockwise:
            return {"format": self.format}
        return {"format": self.format, "block_size": self.block_size, "method": self.method}


@dataclass(frozen=True)
class RecoverySpec:
    """Distillation from the uncompressed model after structural changes (DistilBERT / Minitron recipe).

    ``steps`` optimiser steps of ``batch_size`` training texts (AdamW at ``learning_rate``), the
    order fixed by ``seed``; the loss matches the pooled embedding the task reads (MSE + 1 - cosine)
    plus ``hidden_weight`` x MSE of the last hidden states. No labels are used. ``flat_patience``:
    stop early once the mean loss of a window of steps (a tenth of them, at least 10) has fallen by
    less than 1% from the best window's this many windows in a row (0: every step runs). The rule
    reads only the losses, so a rebuild stops at the same step. ``budget_s``: stop after this many
    seconds of training; a plan stopped by it is recorded with the steps it did and no budget, so
    its rebuild repeats exactly those.
    """

    steps: int
    batch_size: int = 16
    learning_rate: float = 1e-4
    hidden_weight: float = 0.0
    seed: int = 0
    flat_patience: int = 0
    budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.flat_patience < 0:
            raise PlanError(f"recovery needs at least one step of at least one text (steps={self.steps}) and "
                            f"flat_patience >= 0")
        if self.budget_s is not None and self.budget_s <= 0:
            raise PlanError(f"recovery budget_s must be positive seconds, not {self.budget_s}")
        if not 0.0 < self.learning_rate < 1.0 or self.hidden_weight < 0:
            raise PlanError("recovery learning_rate must be in (0, 1) and hidden_weight >= 0")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _frozen_mapping(items: Mapping) -> Mapping:
    return MappingProxyType(dict(sorted(items.items())))


@dataclass(frozen=True)
class CompressionPlan:
    """Per-module choices, keyed by module names of the *original* model.

    quantize:        Linear or Embedding name -> QuantSpec (absent means fp32).
    low_rank:        Linear name -> rank fraction in (0, 1) of min(in, out) after pruning, applied
                     only where the two factors hold fewer parameters than the matrix.
    low_rank_method: ``svd`` (plain truncated SVD) or ``asvd`` (SVD of the weight scaled by the
                     calibration activations' channel magnitudes, as in ASVD); one per model.
    ffn_prune:       transformer block name -> fraction in [0, 1) of FFN intermediate neurons removed.
    head_prune:      transformer block name -> fraction in [0, 1) of attention heads removed (whole
                     key/value groups under grouped-query attention).
    depth_prune:     names of transformer blocks removed whole (Minitron depth pruning).
    recovery:        distillation from the uncompressed model after the structural changes, or None.

    Entries for modules inside removed blocks are dropped: they change nothing.
    """

    quantize: Mapping[str, QuantSpec] = field(default_factory=dict)
    low_rank: Mapping[str, float] = field(default_factory=dict)
    ffn_prune: Mapping[str, float] = field(default_factory=dict)
    head_prune: Mapping[str, float] = field(default_factory=dict)
    depth_prune: tuple[str, ...] = ()
    low_rank_method: str = "svd"
    recovery: RecoverySpec | None = None

    def __post_init__(self) -> None:
        for name, fraction in self.low_rank.items():
            if not 0.0 < fraction <= 1.0:
                raise PlanError(f"low_rank[{name!r}] = {fraction}: rank fraction must be in (0, 1]")
        for section in ("ffn_prune", "head_prune"):
            for name, fraction in getattr(self, section).items():
                if not 0.0 <= fraction < 1.0:
                    raise PlanError(f"{section}[{name!r}] = {fraction}: the removed fraction must be in [0, 1)")
        if self.low_rank_method not in LOW_RANK_METHODS:
            raise PlanError(f"unknown low-rank method {self.low_rank_method!r}; use one of {LOW_RANK_METHODS}")
        dropped = tuple(sorted(set(self.depth_prune)))

        def alive(name: str) -> bool:
            return not any(name == block or name.startswith(block + ".") for block in dropped)

        # Drop no-op entries so that equal compressions have equal plans (and equal digests).
        object.__setattr__(self, "depth_prune", dropped)
        object.__setattr__(self, "quantize", _frozen_mapping(
            {k: v for k, v in self.quantize.items() if v.format != "fp32" and alive(k)}))
        object.__setattr__(self, "low_rank", _frozen_mapping(
            {k: v for k, v in self.low_rank.items() if v < 1.0 and alive(k)}))
        for section in ("ffn_prune", "head_prune"):
            object.__setattr__(self, section, _frozen_mapping(
                {k: v for k, v in getattr(self, section).items() if v > 0.0 and alive(k)}))
        if not self.low_rank:
            object.__setattr__(self, "low_rank_method", "svd")
        if not self.changes_shapes:
            object.__setattr__(self, "recovery", None)  # nothing to recover from

    @property
    def changes_shapes(self) -> bool:
        """True when the plan removes or factorises weights (what distillation recovers from)."""
        return bool(self.low_rank or self.ffn_prune or self.head_prune or self.depth_prune)

    @property
    def is_identity(self) -> bool:
        return not (self.quantize or self.changes_shapes)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "quantize": {k: v.to_json() for k, v in self.quantize.items()},
            "low_rank": dict(self.low_rank),
            "low_rank_method": self.low_rank_method,
            "ffn_prune": dict(self.ffn_prune),
            "head_prune": dict(self.head_prune),
            "depth_prune": list(self.depth_prune),
            "recovery": self.recovery.to_json() if self.recovery else None,
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
        if version not in (1, PLAN_VERSION):  # version 1 is version 2 without the newer sections
            raise PlanError(f"plan version {version!r} is not supported; this slimtune reads versions 1 and {PLAN_VERSION}")
        unknown = set(data) - {"version", "quantize", "low_rank", "low_rank_method", "ffn_prune", "head_prune",
                               "depth_prune", "recovery"}
        if unknown:
            raise PlanError(f"plan has unknown sections {sorted(unknown)}")
        try:
            recovery = data.get("recovery")
            return cls(
                quantize={k: QuantSpec(**v) for k, v in data.get("quantize", {}).items()},
                low_rank={k: float(v) for k, v in data.get("low_rank", {}).items()},
                low_rank_method=str(data.get("low_rank_method", "svd")),
                ffn_prune={k: float(v) for k, v in data.get("ffn_prune", {}).items()},
                head_prune={k: float(v) for k, v in data.get("head_prune", {}).items()},
                depth_prune=tuple(str(b) for b in data.get("depth_prune", ())),
                recovery=RecoverySpec(**recovery) if recovery else None,
            )
        except (TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"plan is malformed: {exc}") from exc

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
