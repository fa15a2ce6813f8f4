"""The contract, for the blockwise quantization formats, on every architecture of the suite.

4-bit embedding tables (GatherBlockQuantized), int4 Linears by round-to-nearest, GPTQ and HQQ,
several block sizes and methods in one plan, and 2-bit Linears (ONNX Runtime 1.32's CPU
MatMulNBits runs them; ``tests/export/test_verify.py`` checks its results against numpy).

Tolerances (worst row cosine to the torch reference on the shared token batch), from what the
tiny random models reach, with margin: 4-bit tables 0.98 (measured 0.991-0.9998); int4 Linears
0.97 (0.985-0.99999; the Llama-style model loses the most); 2-bit Linears 0.7 (Llama-style 0.77,
the others 0.999: random BERT weights are easy). Besides the contract's loose size check, the
stored weights must change the file's initializer bytes by exactly what ``predict_size_bytes``
predicts.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from slimtune.export import ExportError, build_artifact, predict_size_bytes
from slimtune.layout import discover_layout
from slimtune.model import PooledEmbedding
from slimtune.plan import CompressionPlan, QuantSpec
from slimtune.transforms import apply_structural

TABLE = {"bert": "embeddings.word_embeddings", "distilbert": "embeddings.word_embeddings", "llama": "embed_tokens"}
ATTENTION_MATMULS = 4  # activation x activation products of the two blocks: never quantized


def _initializer_bytes(path) -> int:
    graph = onnx.load(str(path)).graph
    return sum(len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes for init in graph.initializer)


def _check_weight_bytes(model, plan, tmp_path, calibration=None) -> None:
    """The quantized weights change the stored bytes by exactly the predicted amount."""
    fp32 = build_artifact(model, CompressionPlan(), tmp_path / "fp32-bytes.onnx")
    planned = build_artifact(model, plan, tmp_path / "planned-bytes.onnx", calibration)
    measured = _initializer_bytes(planned.path) - _initializer_bytes(fp32.path)
    predicted = (predict_size_bytes(apply_structural(model, plan, calibration), plan)
                 - predict_size_bytes(model, CompressionPlan()))
    assert measured == predicted


@pytest.mark.parametrize("block", [32, 128])
def test_int4_embedding_table(arch, tiny_model, contract, tmp_path, block):
    model = tiny_model(arch)
    plan = CompressionPlan(quantize={TABLE[arch]: QuantSpec("int4", block)})
    linears = len(discover_layout(model).linears)
    artifact = contract(model, plan, tmp_path, 0.98,
                        {"GatherBlockQuantized": 1, "MatMul": linears + ATTENTION_MATMULS, "MatMulNBits": 0})
    _check_weight_bytes(model, plan, tmp_path)
    graph = onnx.load(str(artifact.path)).graph
    stored = {init.name: init.data_type for init in graph.initializer}
    assert stored[f"model.{TABLE[arch]}.weight_Q4"] == onnx.TensorProto.UINT4
    other_tables = [n for n in stored if "embeddings.weight" in n and TABLE[arch] not in n]
    assert all(stored[n] == onnx.TensorProto.FLOAT for n in other_tables)  # position / token-type tables untouched


def _uniform(model, spec: QuantSpec) -> CompressionPlan:
    return CompressionPlan(quantize={name: spec for name in discover_layout(model).linears})


@pytest.mark.parametrize("spec", [QuantSpec("int4", 64, "rtn"), QuantSpec("int4", 32, "gptq"),
                                  QuantSpec("int4", 32, "hqq")], ids=["rtn-64", "gptq-32", "hqq-32"])
def test_int4_linears(arch, tiny_model, contract, calibrate, tmp_path, spec):
    model = tiny_model(arch)
    plan, calibration = _uniform(model, spec), calibrate(model)
    linears = len(discover_layout(model).linears)
    artifact = contract(model, plan, tmp_path, 0.97, {"MatMulNBits": linears, "MatMul": ATTENTION_MATMULS},
                        calibration)
    _check_weight_bytes(model, plan, tmp_path, calibration)
    for node in onnx.load(str(artifact.path)).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert (attrs["bits"], attrs["block_size"]) == (4, spec.block_size)


@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
def test_int2_linears(arch, tiny_model, contract, calibrate, tmp_path, method):
    model = tiny_model(arch)
    plan, calibration = _uniform(model, QuantSpec("int2", 16, method)), calibrate(model)
    linears = len(discover_layout(model).linears)
    contract(model, plan, tmp_path, 0.7, {"MatMulNBits": linears, "MatMul": ATTENTION_MATMULS}, calibration)
    _check_weight_bytes(model, plan, tmp_path, calibration)


def test_mixed_block_sizes_methods_and_formats_in_one_plan(arch, tiny_model, contract, calibrate, tmp_path):
    model = tiny_model(arch)
    linears = discover_layout(model).linears
    quantize = {name: QuantSpec("int4", (16, 32, 64, 128)[i % 4], ("rtn", "gptq", "hqq")[i % 3])
                for i, name in enumerate(linears)}
    quantize[linears[0]] = QuantSpec("int8")
    quantize[linears[1]] = QuantSpec("int2", 32, "hqq")
    quantize[TABLE[arch]] = QuantSpec("int4", 16)
    plan, calibration = CompressionPlan(quantize=quantize), calibrate(model)
    artifact = contract(model, plan, tmp_path, 0.97, {
        "MatMulNBits": len(linears) - 1, "MatMulInteger": 1, "GatherBlockQuantized": 1,
        "MatMul": ATTENTION_MATMULS}, calibration)
    _check_weight_bytes(model, plan, tmp_path, calibration)
    blocks = {onnx.helper.get_attribute_value(a) for n in onnx.load(str(artifact.path)).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {16, 32, 64, 128}


def _relative_error(path, model, ids, mask) -> float:
    reference = PooledEmbedding(model)(torch.from_numpy(ids), torch.from_numpy(mask)).detach().numpy()
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids, "attention_mask": mask})[0]
    return float(np.mean(np.linalg.norm(out - reference, axis=1) / np.linalg.norm(reference, axis=1)))


def test_gptq_is_closer_to_fp32_than_round_to_nearest(arch, tiny_model, calibrate, token_batch, tmp_path):
    """On the calibration texts, GPTQ beats RTN on every architecture (measured: 0.5x-0.25x RTN's error).

    On other texts it depends on how many tokens the Hessians saw: with these 92 it still wins
    clearly on BERT (0.3x), barely on DistilBERT and not on the Llama-style model, so the held-out
    check is BERT's only.
    """
    model = tiny_model(arch)
    calibration = calibrate(model)
    errors = {}
    for method in ("rtn", "gptq"):
        artifact = build_artifact(model, _uniform(model, QuantSpec("int4", 32, method)), tmp_path / f"{method}.onnx",
                                  calibration)
        errors[method] = _relative_error(artifact.path, model, *token_batch)
        if arch == "bert":
            held_out = np.random.default_rng(1).integers(1, 1000, size=(8, 24)).astype(np.int64)
            errors[f"{method}-held-out"] = _relative_error(artifact.path, model, held_out, np.ones_like(held_out))
    assert errors["gptq"] <= 0.8 * errors["rtn"], errors
    if arch == "bert":
        assert errors["gptq-held-out"] <= 0.8 * errors["rtn-held-out"], errors


def test_gptq_without_calibration_names_the_fix(bert, tmp_path):
    with pytest.raises(ExportError, match="calibration=collect_calibration"):
        build_artifact(bert, _uniform(bert, QuantSpec("int4", 32, "gptq")), tmp_path / "g.onnx")


@pytest.mark.parametrize("spec", [QuantSpec("int2", 32), QuantSpec("int4", 32, "hqq"), QuantSpec("int4", 32, "gptq")])
def test_embedding_formats_onnx_runtime_cannot_read_are_refused(bert, calibrate, tmp_path, spec):
    plan = CompressionPlan(quantize={"embeddings.word_embeddings": spec})
    with pytest.raises(ExportError, match="GatherBlockQuantized"):
        build_artifact(bert, plan, tmp_path / "e.onnx", calibrate(bert))


def test_gptq_and_hqq_rebuild_the_same_bytes(bert, calibrate, tmp_path):
    quantize = {name: QuantSpec("int4", 32, ("gptq", "hqq")[i % 2]) for i, name in enumerate(discover_layout(bert).linears)}
    plan, calibration = CompressionPlan(quantize=quantize), calibrate(bert)
    first = build_artifact(bert, plan, tmp_path / "a.onnx", calibration).path.read_bytes()
    assert first == build_artifact(bert, plan, tmp_path / "b.onnx", calibration).path.read_bytes()


def test_int8_in_memory_is_byte_for_byte_what_onnx_runtimes_file_path_writes(arch, tiny_model, tmp_path, monkeypatch):
    """The in-memory int8 pass (no save / reload for shape inference) against ONNX Runtime's own
    quantize_dynamic entry point, on the same plan: the same file."""
    import slimtune.export.int8 as quantize

    model = tiny_model(arch)
    linears = discover_layout(model).linears
    plan = CompressionPlan(quantize={name: QuantSpec("int8") for name in linears[: len(linears) // 2 + 1]})
    in_memory = build_artifact(model, plan, tmp_path / "memory.onnx").path.read_bytes()
    monkeypatch.setattr(quantize, "IN_MEMORY_LIMIT_BYTES", 0)  # every graph takes the file path
    through_files = build_artifact(model, plan, tmp_path / "files.onnx").path.read_bytes()
    assert in_memory == through_files
