"""The verifier catches graphs that are not the planned compression, and the passes it relies on.

Wrong graphs are made the way a pass could go wrong: running it on too few nodes (a planned layer
left fp32), on too many (an unplanned layer changed), with the wrong block size, or with the 4-bit
table quantizer left unrestricted (it rewrites every table). Also here: ONNX Runtime's CPU
MatMulNBits computes with 2-bit weights exactly what numpy computes from the stored blocks.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimtune.export import ExportError
from slimtune.export.int8 import quantize_int8_matmuls
from slimtune.export.onnx_export import export_fp32, weight_matmuls
from slimtune.export.quantize import (
    _matmulnbits_quantizer,
    quantize_blockwise_matmuls,
    quantize_embedding,
)
from slimtune.export.verify import verify_quantized, weight_nodes
from slimtune.layout import discover_layout
from slimtune.plan import QuantSpec

WORD_TABLE = "model.embeddings.word_embeddings.weight"


@pytest.fixture
def graph(bert, tmp_path):
    """The tiny BERT's fp32 graph and MatMul node -> Linear name for every Linear."""
    path = export_fp32(bert, tmp_path / "fp32.onnx")
    model = onnx.load(str(path))
    return model, weight_matmuls(model, set(discover_layout(bert).linears))


def _plan(node_of: dict[str, str], spec: QuantSpec) -> dict[str, tuple[str, QuantSpec]]:
    return {node: (name, spec) for node, name in node_of.items()}


def test_a_correct_graph_passes(graph):
    model, node_of = graph
    before = weight_nodes(model)
    half = sorted(node_of)[: len(node_of) // 2]
    model = quantize_int8_matmuls(model, set(half[:2]))
    model = quantize_blockwise_matmuls(model, set(half[2:]), 4, 32)
    model = quantize_embedding(model, WORD_TABLE, "int4", 64)
    linears = {**_plan({n: node_of[n] for n in half[:2]}, QuantSpec("int8")),
               **_plan({n: node_of[n] for n in half[2:]}, QuantSpec("int4", 32))}
    verify_quantized(model, before, linears, {WORD_TABLE: ("embeddings.word_embeddings", QuantSpec("int4", 64))})


def test_a_planned_layer_left_fp32_is_an_error_naming_it(graph):
    model, node_of = graph
    before = weight_nodes(model)
    skipped = sorted(node_of)[0]
    model = quantize_blockwise_matmuls(model, set(node_of) - {skipped}, 4, 32)
    with pytest.raises(ExportError, match=f"{node_of[skipped]}: planned int4 block 32 .*still MatMul"):
        verify_quantized(model, before, _plan(node_of, QuantSpec("int4", 32)), {})


def test_an_unplanned_layer_that_changed_is_an_error(graph):
    model, node_of = graph
    before = weight_nodes(model)
    planned, extra = sorted(node_of)[:3], sorted(node_of)[3]
    model = quantize_blockwise_matmuls(model, {*planned, extra}, 4, 32, "hqq")
    with pytest.raises(ExportError, match=f"MatMul '{extra}' is not planned but changed"):
        verify_quantized(model, before, _plan({n: node_of[n] for n in planned}, QuantSpec("int4", 32, "hqq")), {})


def test_a_wrong_block_size_or_bit_width_is_an_error(graph):
    model, node_of = graph
    before = weight_nodes(model)
    model = quantize_blockwise_matmuls(model, set(node_of), 4, 32)
    with pytest.raises(ExportError, match="block 64"):
        verify_quantized(model, before, _plan(node_of, QuantSpec("int4", 64)), {})
    with pytest.raises(ExportError, match="int2"):
        verify_quantized(model, before, _plan(node_of, QuantSpec("int2", 32)), {})


def test_an_unrestricted_table_quantizer_changes_every_table_and_is_caught(graph):
    model, _ = graph
    before = weight_nodes(model)
    model.ir_version = 10
    quantizer = _matmulnbits_quantizer()(model, bits=4, block_size=32, op_types_to_quantize=("Gather",),
                                         nodes_to_include=[g for g, t in before.gathers.items() if t == WORD_TABLE])
    with np.errstate(divide="ignore", invalid="ignore"):  # the token-type table has constant blocks
        quantizer.process()
    with pytest.raises(ExportError, match="position_embeddings.weight' \(lookup .*\) is not planned but changed"):
        verify_quantized(quantizer.model.model, before, {}, {WORD_TABLE: ("word", QuantSpec("int4", 32))})


def test_the_table_pass_changes_only_the_planned_table(graph):
    model, _ = graph
    before = weight_nodes(model)
    assert len(before.gathers) == 3  # word, position and token-type tables
    model = quantize_embedding(model, WORD_TABLE, "int4", 32)
    verify_quantized(model, before, {}, {WORD_TABLE: ("word", QuantSpec("int4", 32))})
    with pytest.raises(ExportError, match="planned int8"):
        verify_quantized(model, before, {}, {WORD_TABLE: ("word", QuantSpec("int8"))})


def _tied_graph() -> onnx.ModelProto:
    """A table read by a lookup and, transposed, by an output projection (tied weights)."""
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32), "table")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="lookup"),
             helper.make_node("Transpose", ["table"], ["t"], name="tied"),
             helper.make_node("MatMul", ["h", "t"], ["logits"], name="project")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 50])], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("weight_format", ["int4", "int8"])
def test_a_tied_table_is_refused(weight_format):
    with pytest.raises(ExportError, match="tied weights"):
        quantize_embedding(_tied_graph(), "table", weight_format, 32)


def _one_matmul(k: int, n: int) -> tuple[onnx.ModelProto, np.ndarray]:
    weight = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, n])], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weight


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    return np.stack([(packed >> (bits * j)) & (2 ** bits - 1) for j in range(per)], -1).reshape(*packed.shape[:-1], -1)


@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
@pytest.mark.parametrize("bits,block", [(2, 16), (2, 64), (4, 32)])
def test_matmulnbits_computes_what_the_stored_blocks_say(method, bits, block):
    """K = 96 gives an odd block count at 32 and a padded block at 64: both layouts must be right."""
    k, n = 96, 40
    model, weight = _one_matmul(k, n)
    x = np.random.default_rng(1).standard_normal((2, 5, k)).astype(np.float32)
    feeds = [{"x": x, "attention_mask": np.ones((2, 5), np.int64)}]
    model = quantize_blockwise_matmuls(model, {"mm"}, bits, block, method, feeds)
    node = next(nd for nd in model.graph.node if nd.op_type == "MatMulNBits")
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    packed, scales, zeros = (stored[name] for name in node.input[1:4])
    blocks = -(-k // block)
    scales = scales.reshape(n, blocks)
    zeros = zeros.reshape(n, blocks) if zeros.dtype != np.uint8 else _unpack(zeros, bits)[:, :blocks]
    values = _unpack(packed, bits).reshape(n, blocks, block).astype(np.float32)
    dequantized = ((values - zeros[..., None].astype(np.float32)) * scales[..., None]).reshape(n, -1)[:, :k].T
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, x @ dequantized, atol=1e-4, rtol=1e-4)
    error = np.linalg.norm(out - x @ weight) / np.linalg.norm(x @ weight)
    assert error < (0.6 if bits == 2 else 0.15)  # measured 0.33-0.50 (2-bit), 0.07-0.09 (4-bit)


def test_a_build_lets_go_of_the_node_between_its_passes_and_gptq_steps(bert, tmp_path):
    """A trial's build holds the node lock shared pass by pass (GPTQ step by step), so a timing that
    waits for the node waits for one step, not the whole quantization; the waits are not build time."""
    import contextlib
    import time

    from slimtune.export import build_artifact
    from slimtune.transforms import collect_calibration

    layout = discover_layout(bert)
    ids = np.random.default_rng(0).integers(1, 1000, (16, 12))
    calibration = collect_calibration(bert, ids, np.ones_like(ids)).with_training(ids, np.ones_like(ids), None)
    plan_of = {"gptq": {n: QuantSpec("int4", 32, "gptq") for n in layout.linears[:3]},
               "int8": {n: QuantSpec("int8") for n in layout.linears[3:]}}
    entered = []

    @contextlib.contextmanager
    def hold():
        time.sleep(0.25)  # a wait for the node, outside the build's timings
        entered.append(1)
        yield

    from slimtune.plan import CompressionPlan

    plan = CompressionPlan(quantize={**plan_of["gptq"], **plan_of["int8"]})
    artifact = build_artifact(bert, plan, tmp_path / "m.onnx", calibration, hold=hold)
    batches = 2  # 16 calibration texts, 8 a batch
    gptq_inputs = len({n.rsplit(".", 1)[0] for n in plan_of["gptq"]})  # q, k and v read one input
    # compress, export, int8, each GPTQ batch, factor and Linear, verification, the rest
    assert len(entered) >= 2 + 1 + batches + gptq_inputs + len(plan_of["gptq"]) + 2
    assert 0 < artifact.build_s < 0.25 * len(entered)  # the waits (>= 2.5 s here) are not build time
    quiet = build_artifact(bert, plan, tmp_path / "q.onnx", calibration)
    assert artifact.path.read_bytes() == quiet.path.read_bytes()  # holding in steps builds the same bytes
