"""The contract every compression method meets, as a fixture other test files call.

``contract(model, plan, tmp_path, min_cosine, kernels)`` builds the artifact and checks: the file
runs in ONNX Runtime and stays close to the uncompressed torch reference (worst row cosine), its
size on disk matches what the plan predicts (weights) plus the fp32 graph's own overhead, and the
final graph holds exactly the given kernel counts. ``tiny_model(arch)`` builds a BERT, a
DistilBERT or a Llama-style (gated MLP, grouped-query attention) model from a config.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, LlamaConfig, LlamaModel

from slimtune.export import Artifact, build_artifact, predict_size_bytes
from slimtune.model import PooledEmbedding
from slimtune.plan import CompressionPlan
from slimtune.transforms import Calibration, apply_structural, collect_calibration

ARCHITECTURES = ("bert", "distilbert", "llama")


def build_tiny(arch: str, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "bert":
        config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=256, max_position_embeddings=64)
        return BertModel(config).eval()
    if arch == "distilbert":
        config = DistilBertConfig(vocab_size=1000, dim=64, n_layers=layers, n_heads=4, hidden_dim=256,
                                  max_position_embeddings=64)
        return DistilBertModel(config).eval()
    config = LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64)
    return LlamaModel(config).eval()


@pytest.fixture
def tiny_model():
    """``tiny_model(arch, seed=0, layers=2)`` builds a random tiny model of that architecture."""
    return build_tiny


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    """Parametrizes a test over every architecture of the contract suite."""
    return request.param


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.fixture
def calibrate(token_batch):
    """``calibrate(model)``: activation statistics of ``model`` on the shared token batch."""
    return lambda model: collect_calibration(model, *token_batch)


@pytest.fixture
def contract(token_batch):
    ids, mask = token_batch

    def check(model: torch.nn.Module, plan: CompressionPlan, tmp_path, min_cosine: float,
              kernels: dict[str, int], calibration: Calibration | None = None) -> Artifact:
        reference = PooledEmbedding(model)(torch.from_numpy(ids), torch.from_numpy(mask)).detach().numpy()
        artifact = build_artifact(model, plan, tmp_path / "candidate.onnx", calibration)
        out = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"]).run(
            None, {"input_ids": ids, "attention_mask": mask})[0]
        assert _cosine(out, reference) >= min_cosine

        fp32 = build_artifact(model, CompressionPlan(), tmp_path / "fp32-reference.onnx")
        graph_bytes = fp32.size_bytes - predict_size_bytes(model, CompressionPlan())
        predicted = predict_size_bytes(apply_structural(model, plan, calibration), plan) + graph_bytes
        assert abs(artifact.size_bytes - predicted) <= 0.03 * predicted + 16_384, (artifact.size_bytes, predicted)

        for op_type, count in kernels.items():
            assert artifact.kernels.get(op_type, 0) == count, (op_type, artifact.kernels)
        return artifact

    return check
