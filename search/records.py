"""Trial records: what each trial ended with, as plain values (importing them loads neither torch
nor Ray), and what listens for them. ``trial_log.py`` makes them from Ray's callback hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from slimtune.search.objectives import Objectives


@dataclass(frozen=True)
class TrialRecord:
    """One trial. ``status``: running, completed, failed or stopped. ``reference`` names a reference point;
    ``recovered_from`` the trial whose plan this one distilled after the search (front recovery)."""

    number: int
    trial_id: str
    params: dict[str, Any]
    status: str = "running"
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    reference: str = ""
    recovered_from: int | None = None

    def values(self, objectives: Objectives) -> tuple[float, ...]:
        """The measured value of each objective, in their order."""
        return tuple(float(self.metrics[name]) for name, _ in objectives)

    @property
    def name(self) -> str:
        """trial-007: the MLflow run name and the file stem in results/<search>/plans and models."""
        return f"trial-{self.number:03d}"

    @property
    def label(self) -> str:
        if self.recovered_from is not None:
            return f"{self.name} (trial-{self.recovered_from:03d} recovered)"
        return self.name + (f" ({self.reference})" if self.reference else "")


class TrialListener(Protocol):
    def trial_started(self, record: TrialRecord) -> None: ...

    def trial_finished(self, record: TrialRecord) -> None: ...
