"""Where a figure was measured: the hardware target every latency belongs to.

A latency is only comparable with latencies of the same target: the CPU model, its logical core
count, the ONNX Runtime version and the execution provider. ``node`` says which machine of a
cluster measured it (two identical machines are one target).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class HardwareTarget:
    cpu: str
    cores: int
    onnxruntime: str
    provider: str
    node: str

    @property
    def key(self) -> str:
        """A short, stable name of the target (the node excluded): ``<cpu>/<cores>c/ort<version>/<provider>``."""
        cpu = " ".join(self.cpu.replace("(R)", "").replace("(TM)", "").split())
        return f"{cpu}/{self.cores}c/ort{self.onnxruntime}/{self.provider.removesuffix('ExecutionProvider')}"

    def as_dict(self) -> dict[str, str | int]:
        return asdict(self)


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


# The instruction sets that decide which ONNX Runtime kernels are fast (int8 dot products above all).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimd",
                "asimddp", "i8mm", "sve")


def cpu_flags() -> tuple[str, ...]:
    """Which of ``KERNEL_FLAGS`` this CPU has (from /proc/cpuinfo; empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return ()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.lower().startswith(("flags", "features")):
            present = set(line.partition(":")[2].split())
            return tuple(f for f in KERNEL_FLAGS if f in present)
    return ()


def cpu_description() -> str:
    """The CPU as a published timing names it: model, logical cores and its kernel-relevant flags."""
    flags = cpu_flags()
    return f"{_cpu_model()}, {os.cpu_count() or 1} cores, flags {' '.join(flags) if flags else 'unknown'}"


def _node_id() -> str:
    """The Ray node id inside a Ray worker or driver; the host name elsewhere."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - no Ray, or no runtime context: the host name identifies the machine
        pass
    return socket.gethostname()


@functools.lru_cache(maxsize=1)
def _machine() -> tuple[str, int, str]:
    """(CPU model, logical cores, ONNX Runtime version): read once per process."""
    import onnxruntime as ort

    return _cpu_model(), os.cpu_count() or 1, ort.__version__


def current_target(provider: str = CPU_PROVIDER) -> HardwareTarget:
    """This machine as a hardware target. The node is read each time, not kept: a driver that asked
    before it started Ray (its kernel modes are measured first) would otherwise name its host
    instead of its Ray node for every point it measures after, and the front's re-timing, which
    runs each point on the node the figure names, could not find it."""
    cpu, cores, onnxruntime = _machine()
    return HardwareTarget(cpu=cpu, cores=cores, onnxruntime=onnxruntime, provider=provider, node=_node_id())


def fingerprint(*parts: str) -> str:
    """A 16-hex digest of strings (order matters)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
