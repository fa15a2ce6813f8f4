"""Rebuilding a front point from the original model exactly as the search built it: the same plan,
calibration texts, seeds, kernel modes and build thread count (both recorded with the measured
result and read back here), into a file whose SHA-256 must equal the measured one."""

from __future__ import annotations

from pathlib import Path

import torch

from slimtune.config import Config
from slimtune.export import KernelModes, build_artifact
from slimtune.export.size import file_sha256
from slimtune.plan import CompressionPlan
from slimtune.search.trial import task_calibration


class ReleaseError(RuntimeError):
    """The chosen point could not be rebuilt as measured; the message says what differs."""


def recorded_build_threads(row: dict[str, str], config: Config) -> int:
    """The torch threads the search built ``row``'s artifact with, as its trial recorded them. A
    search from before they were recorded: its rule then (trials used ``cpus_per_trial``, front
    recovery every core)."""
    import os

    if row.get("build_threads"):
        return int(float(row["build_threads"]))
    return (os.cpu_count() or 1) if row.get("recovered_from") else max(1, int(config.search.cpus_per_trial))


def rebuild(row: dict[str, str], plan: CompressionPlan, model, task, config: Config, path: Path) -> str:
    """Build ``row``'s plan at ``path`` with the recorded threads and kernel modes (the caller's torch
    thread setting is put back after); the file's SHA-256, checked against the recorded one."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(recorded_build_threads(row, config))
    try:
        artifact = build_artifact(model, plan, path, task_calibration(model, task), task.output,
                                  modes=KernelModes.loads(row.get("kernel_modes")))
    finally:
        torch.set_num_threads(threads_before)
    digest = file_sha256(artifact.path)
    if row.get("artifact_sha256") and digest != row["artifact_sha256"]:
        raise ReleaseError(f"the rebuilt {row['trial']} differs from the measured file (SHA-256 {digest[:12]} vs "
                           f"{row['artifact_sha256'][:12]}): the model, its files or this environment changed")
    return digest
