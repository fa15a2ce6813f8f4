"""Nothing shared but Ray: how the model, the prepared task and the results travel in a cluster.

The driver puts the model folder's files and the prepared task's bytes into Ray's object store
once; each node writes them to its own temporary folder the first time one of its workers needs
them (keyed by their fingerprint, so a node never mixes two searches' inputs). Trials keep their
measured-results cache and artifacts in a node-local work folder. What the driver needs back (the
reason a watchdog ended a worker, the front's artifacts, an isolated re-measurement) comes
through Ray too: the cluster's key-value store, and tasks pinned to the node that holds the file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.evaluators.hardware import fingerprint
from slimtune.model import source_fingerprint

FAULT_NAMESPACE = "slimtune-faults"


@dataclass(frozen=True)
class Shipment:
    """Object-store references to a search's inputs. ``model_files``: {relative path: bytes} of a
    local model folder, or None when workers load a hub id themselves."""

    search_id: str
    model_source: str
    model_files: Any
    model_fingerprint: str
    task_bytes: Any
    task_fingerprint: str


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def inputs_fingerprints(model_source: str, task: bytes) -> tuple[str, str]:
    """(model, task) fingerprints: the model's files as ``source_fingerprint`` sees them, the task's bytes."""
    return fingerprint(source_fingerprint(model_source)), hashlib.sha256(task).hexdigest()[:16]


def ship(search_id: str, model_source: str, task_path: Path) -> Shipment:
    """Put the model folder (when local) and the task file into the object store; returns the references."""
    import ray

    folder = Path(model_source)
    files = _folder_files(folder) if folder.is_dir() else None
    task = task_path.read_bytes()
    model_fingerprint, task_fingerprint = inputs_fingerprints(model_source, task)
    return Shipment(search_id=search_id, model_source=model_source,
                    model_files=ray.put(files) if files is not None else None, model_fingerprint=model_fingerprint,
                    task_bytes=ray.put(task), task_fingerprint=task_fingerprint)


def node_root() -> Path:
    """This node's folder for slimtune's trial files (its own temporary folder)."""
    return Path(tempfile.gettempdir()) / f"slimtune-{os.getuid()}"


def _materialize(target: Path, write) -> Path:
    """Create ``target`` once per node, atomically: written under a temporary name, then renamed."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    write(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another worker of this node finished first
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    return target


def unpack(shipment: Shipment) -> tuple[str, Path]:
    """(model source, task path) usable on this node: shipped files written under ``node_root()``."""
    import ray

    def write_model(tmp: Path) -> None:
        for name, data in ray.get(shipment.model_files).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)

    source = shipment.model_source
    if shipment.model_files is not None:
        source = str(_materialize(node_root() / "models" / shipment.model_fingerprint, write_model))
    task = _materialize(node_root() / "tasks" / f"{shipment.task_fingerprint}.npz",
                        lambda tmp: tmp.write_bytes(ray.get(shipment.task_bytes)))
    return source, task


def node_work_dir(search_id: str) -> Path:
    """Where this node keeps a search's measured results, artifacts and fault notes."""
    return node_root() / "work" / search_id


def report_fault(trial_id: str, reason: str) -> None:
    """Leave the reason a worker is being ended where the driver can read it: Ray's key-value store."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(trial_id, reason, overwrite=True, namespace=FAULT_NAMESPACE)  # noqa: SLF001


def read_fault(trial_id: str) -> str:
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return ""
    value = internal_kv._internal_kv_get(trial_id, namespace=FAULT_NAMESPACE)  # noqa: SLF001
    return value.decode() if value else ""


def on_node(node_id: str, function, *args):
    """Run ``function(*args)`` as a Ray task on the node ``node_id`` (where its files are) and wait for it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(function).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False))
    return ray.get(task.remote(*args))


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def alive_nodes() -> list[str]:
    import ray

    return [node["NodeID"] for node in ray.nodes() if node.get("Alive")]
