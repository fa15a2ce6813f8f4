"""The contract every compression method meets, on a tiny model.

For each method: the exported file runs in ONNX Runtime and stays close to the uncompressed
reference, its size on disk matches what the plan predicts, and the intended kernels are in the
graph (and the replaced ones are gone). The check itself is the ``contract`` fixture
(``tests/transforms/conftest.py``); newer methods have their own files beside this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import pytest
import torch

from slimtune.export import build_artifact
from slimtune.layout import discover_layout
from slimtune.plan import CompressionPlan, QuantSpec
from slimtune.transforms import apply_structural


@dataclass(frozen=True)
class Case:
    name: str
    plan: CompressionPlan
    min_cosine: float
    kernels: dict[str, int]  # op type -> exact count expected in the final graph


def _linears(bert) -> tuple[str, ...]:
    return discover_layout(bert).linears


def _cases(bert) -> list[Case]:
    linears = _linears(bert)
    ffn0 = discover_layout(bert).blocks[0].ffn
    return [
        Case("fp32", CompressionPlan(), 0.99999, {"MatMul": 16}),
        Case("int8", CompressionPlan(quantize={n: QuantSpec("int8") for n in linears}), 0.995,
             # q, k and v read one input, so 3 of the 6 MatMuls per block share one DynamicQuantizeLinear
             {"MatMulInteger": 12, "DynamicQuantizeLinear": 8, "MatMul": 4}),
        Case("int4", CompressionPlan(quantize={n: QuantSpec("int4", 32) for n in linears}), 0.97,
             {"MatMulNBits": 12, "MatMul": 4}),
        Case("embedding-int8", CompressionPlan(quantize={"embeddings.word_embeddings": QuantSpec("int8")}), 0.999,
             {"MatMul": 16}),
        Case("ffn-prune", CompressionPlan(ffn_prune={"encoder.layer.0": 0.5, "encoder.layer.1": 0.25}), 0.95,
             {"MatMul": 16}),
        Case("low-rank", CompressionPlan(low_rank={n: 0.5 for n in ffn0}), 0.9, {"MatMul": 18}),
        Case("mixed", CompressionPlan(quantize={ffn0[0]: QuantSpec("int4", 16), ffn0[1]: QuantSpec("int8")},
                                      low_rank={ffn0[0]: 0.5}, ffn_prune={"encoder.layer.1": 0.5}), 0.9,
             {"MatMulNBits": 2, "MatMulInteger": 1, "MatMul": 14}),
    ]


CASE_NAMES = ["fp32", "int8", "int4", "embedding-int8", "ffn-prune", "low-rank", "mixed"]


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_method_contract(bert, contract, tmp_path, case_name):
    case = next(c for c in _cases(bert) if c.name == case_name)
    contract(bert, case.plan, tmp_path, case.min_cosine, case.kernels)


def test_int8_embedding_table_is_stored_in_int8(bert, tmp_path):
    plan = CompressionPlan(quantize={"embeddings.word_embeddings": QuantSpec("int8")})
    graph = onnx.load(str(build_artifact(bert, plan, tmp_path / "e.onnx").path)).graph
    tables = {i.name: i for i in graph.initializer}
    assert tables["model.embeddings.word_embeddings.weight_int8"].data_type == onnx.TensorProto.INT8
    assert "model.embeddings.word_embeddings.weight" not in tables


def test_compression_makes_files_smaller_in_the_expected_order(bert, tmp_path):
    sizes = {c.name: build_artifact(bert, c.plan, tmp_path / f"{c.name}.onnx").size_bytes
             for c in _cases(bert) if c.name in ("fp32", "int8", "int4", "ffn-prune")}
    assert sizes["int8"] < sizes["fp32"] and sizes["int4"] < sizes["fp32"] and sizes["ffn-prune"] < sizes["fp32"]


def test_same_plan_same_model_same_bytes(bert, tmp_path):
    plan = next(c for c in _cases(bert) if c.name == "mixed").plan
    first = build_artifact(bert, plan, tmp_path / "a.onnx").path.read_bytes()
    second = build_artifact(bert, plan, tmp_path / "b.onnx").path.read_bytes()
    assert first == second


def test_transforms_never_modify_the_input_model(bert):
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    apply_structural(bert, CompressionPlan(ffn_prune={"encoder.layer.0": 0.5}, low_rank={
        "encoder.layer.1.intermediate.dense": 0.25}))
    after = bert.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_export_leaves_the_models_attention_implementation_as_it_was(bert, tmp_path):
    bert.set_attn_implementation("sdpa")
    build_artifact(bert, CompressionPlan(), tmp_path / "a.onnx")
    assert bert.config._attn_implementation == "sdpa"


def test_ffn_pruning_and_svd_contract_on_every_architecture(arch, tiny_model, contract, calibrate, tmp_path):
    from torch import nn

    from slimtune.layout import block_list, discover_layout

    model = tiny_model(arch)
    block = discover_layout(model).blocks[0]
    plan = CompressionPlan(ffn_prune={block.name: 0.5}, low_rank=dict.fromkeys(block.ffn_down, 0.25))
    calibration = calibrate(model)
    transformed = apply_structural(model, plan, calibration)
    list_name, _ = block_list(transformed)
    weight_matmuls = sum(isinstance(m, nn.Linear) for n, m in transformed.named_modules() if n.startswith(list_name))
    attention_products = 2 * len(discover_layout(transformed).blocks)
    assert weight_matmuls == len(discover_layout(model).linears) + len(block.ffn_down)  # each factorised once
    contract(model, plan, tmp_path, 0.9, {"MatMul": weight_matmuls + attention_products}, calibration)
