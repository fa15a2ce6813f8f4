"""The measured-results cache: keyed by everything that changes a figure, written atomically."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from slimtune.config import LatencyConfig
from slimtune.evaluators.hardware import HardwareTarget, current_target
from slimtune.export.modes import EXACT, KernelModes
from slimtune.files import write_atomically
from slimtune.model import source_fingerprint
from slimtune.plan import CompressionPlan, QuantSpec
from slimtune.search.objectives import objectives
from slimtune.search.pareto import pareto_numbers
from slimtune.search.records import TrialRecord
from slimtune.search.trial import measurement_key

TARGET = HardwareTarget(cpu="Some CPU", cores=2, onnxruntime="1.0", provider="CPUExecutionProvider", node="a")


def _key(plan: CompressionPlan = CompressionPlan(), fingerprint: str = "model+task", hardware: HardwareTarget = TARGET,
         latency: LatencyConfig = LatencyConfig(), threads: int = 1, modes: KernelModes = EXACT) -> str:
    return measurement_key(plan, fingerprint, hardware, modes, latency, threads)


def test_the_key_changes_with_everything_a_measurement_depends_on():
    base = _key()
    assert base == _key()
    assert base == _key(hardware=replace(TARGET, node="b"))
    changed = [
        _key(CompressionPlan(quantize={"x": QuantSpec("int8")})),
        _key(fingerprint="other model"),
        _key(latency=LatencyConfig(batch_size=1)),
        _key(threads=2),
        _key(hardware=replace(TARGET, cpu="Other CPU")),
        _key(hardware=replace(TARGET, onnxruntime="2.0")),
        _key(modes=KernelModes(symmetric=(4,))),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_a_model_retrained_in_place_has_a_new_fingerprint(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    before = source_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"new weights!")
    assert source_fingerprint(str(tmp_path)) != before
    assert source_fingerprint("org/hub-model") == "org/hub-model"


def test_concurrent_writers_never_leave_a_partial_file(tmp_path):
    path = tmp_path / "measured" / "key.json"
    errors = []

    def write(value: int) -> None:
        for _ in range(50):
            write_atomically(path, json.dumps({"value": value, "pad": "x" * 20000}))
            try:
                json.loads(path.read_text())
            except ValueError as exc:  # a torn file would not parse
                errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and json.loads(path.read_text())["value"] in range(4)
    assert [p.name for p in path.parent.iterdir()] == ["key.json"]


def test_the_current_target_names_cpu_cores_runtime_provider_and_node():
    target = current_target()
    assert target.cores >= 1 and target.onnxruntime and target.node
    provider = target.provider.removesuffix("ExecutionProvider")
    assert target.key.endswith(f"/{provider}") and f"/{target.cores}c/" in target.key
    gpu = current_target("CUDAExecutionProvider")  # a GPU evaluator's target is another target
    assert gpu.key.endswith("/CUDA") and gpu.key != target.key


@pytest.mark.parametrize("second_target", ["fast machine", "slow machine"])
def test_each_hardware_target_has_its_own_front(second_target):
    def record(number, score, latency, hardware):
        return TrialRecord(number=number, trial_id=str(number), params={}, status="completed",
                           metrics={"accuracy": score, "latency_ms": latency, "size_mb": 1.0,
                                    "plan_digest": str(number), "hardware": hardware})

    records = [record(0, 0.9, 50.0, "slow machine"), record(1, 0.8, 20.0, "slow machine"),
               record(2, 0.85, 10.0, second_target)]
    # Measured on another target, trial 2 is compared with nothing of the first; on the same one it dominates trial 1.
    assert pareto_numbers(records, objectives("accuracy")) == {0, 2} | ({1} if second_target == "fast machine" else set())
