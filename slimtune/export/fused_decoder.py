"""Write a Llama-family causal LM (Llama, Mistral, Qwen2) as a fused ONNX decoder, block by block.

The graph ONNX Runtime decodes fastest on CPU is the one its GenAI model builder writes: per
block an RMS norm fused with the residual add (``SkipSimplifiedLayerNormalization``, whose extra
output is the residual sum the next norm reads), the query/key/value projections, one
``GroupQueryAttention`` (com.microsoft) with the rotary embedding inside (one cos/sin cache shared
by all blocks, positions from the attention mask), the output projection, the gated MLP (SiLU as
Sigmoid x input) and the down projection: about 15 nodes a block, where tracing the model's own
forward writes about a hundred (masks, positions and cache expansion op by op).

Written here from the (transformed) torch module's weights, so each block keeps its own query
and key/value head counts (``num_heads`` / ``kv_num_heads`` are node attributes), its own MLP
width and its factorised Linears (two MatMuls), and removed blocks are left out with the cache
inputs and outputs renumbered over the kept ones. The signature is the traced export's
(``slimtune.export.decoder``): ``input_ids``, ``attention_mask``, ``past_key_values.{j}.key/value``
(batch, kv heads, past, head size) -> ``logits``, ``present.{j}.key/value``. Node names follow the
TorchScript exporter's (``/model/<module path>/MatMul``), so the quantization passes and
``verify`` find every planned Linear by its module name, and every weight format applies unchanged.

The geometry (head size, rotary frequencies and scaling, norm epsilon, sliding windows) comes from
``slimtune.layout.decoder_geometry``. Sequences are unpadded or right-padded: the kernel reads
each row's length from ``attention_mask`` (``seqlens_k`` = its sum - 1). ONNX Runtime's CPU kernel
needs a head size that is a multiple of 16 with rotary inside, and query heads that are a whole
multiple of the key/value heads (head pruning removes whole key/value groups, so this holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from slimtune.export.decoder import PAST, PRESENT
from slimtune.export.onnx_export import ExportError
from slimtune.layout import DecoderGeometry, block_list, decoder_geometry
from slimtune.model import WRAPPED

FUSED_OPSET = 21  # what 4-bit tables (uint4) need: no version conversion later (it knows no contrib ops)
MODEL_TYPES = ("llama", "mistral", "qwen2")  # rotary decoders whose blocks have the module names below
_BLOCK_MODULES = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def fusion_refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot be written as a fused decoder (None when it can): the architecture,
    the activation, the rotary embedding or the head size the CPU kernel takes."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"model type {model_type!r} has no fused adapter (fused: {', '.join(MODEL_TYPES)})"
    geometry = decoder_geometry(model)
    if geometry is None:
        return "no rotary embedding with a fixed cos/sin cache over the whole head"
    if geometry.activation != "silu":
        return f"MLP activation {geometry.activation!r} (the fused graph writes SiLU)"
    if geometry.head_dim % 16:
        return f"head size {geometry.head_dim} (GroupQueryAttention with rotary needs a multiple of 16)"
    modules = dict(model.named_modules())
    for key, _ in block_list(model)[1].named_children():
        missing = [m for m in _BLOCK_MODULES if f"model.layers.{key}.{m}" not in modules]
        if missing:
            return f"block {key} has no {missing[0]}"
    return None


@dataclass
class _Graph:
    """Nodes and initializers being written; every node named after the module it computes."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], scope: str, domain: str = "", **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"/{WRAPPED}/{scope.replace('.', '/')}/{op}",
                                           domain=domain, **attrs))


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _linear(graph: _Graph, module: nn.Module, name: str, x: str) -> str:
    """``x`` times a Linear (MatMul on the transposed weight, then its bias) or a factorised one
    (``.first`` then ``.second``); returns the output's name."""
    if not isinstance(module, nn.Linear):
        first, second = getattr(module, "first", None), getattr(module, "second", None)
        if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)):
            raise ExportError(f"{name} is a {type(module).__name__}; the fused decoder writes Linear layers")
        return _linear(graph, second, f"{name}.second", _linear(graph, first, f"{name}.first", x))
    weight = graph.constant(f"{WRAPPED}.{name}.weight_T", _array(module.weight).T)
    out = f"/{WRAPPED}/{name}/MatMul_output"
    graph.node("MatMul", [x, weight], [out], name)
    if module.bias is None:
        return out
    bias = graph.constant(f"{WRAPPED}.{name}.bias", _array(module.bias))
    graph.node("Add", [out, bias], [f"{out}_biased"], name)
    return f"{out}_biased"


def _norm(graph: _Graph, module: nn.Module, name: str, x: str, residual: str | None, eps: float) -> tuple[str, str]:
    """RMS norm of ``x`` (+ ``residual`` first, fused): (normalised, the residual sum it normalised)."""
    weight = graph.constant(f"{WRAPPED}.{name}.weight", _array(module.weight))
    out = f"/{WRAPPED}/{name}/output"
    if residual is None:
        graph.node("SimplifiedLayerNormalization", [x, weight], [out], name, axis=-1, epsilon=eps, stash_type=1)
        return out, x
    total = f"/{WRAPPED}/{name}/residual_sum"
    graph.node("SkipSimplifiedLayerNormalization", [x, residual, weight], [out, "", "", total], name,
               domain="com.microsoft", epsilon=eps)
    return out, total


def _rotary_cache(geometry: DecoderGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of every position and frequency: (max_positions, head_dim / 2) float32."""
    positions = np.arange(geometry.max_positions, dtype=np.float64)[:, None]
    angles = positions * np.asarray(geometry.inv_freq, np.float64)[None, :]
    scale = geometry.rotary_scale
    return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32)


def _sequence_lengths(graph: _Graph) -> tuple[str, str]:
    """``seqlens_k`` (batch,) int32 = each row's mask sum - 1 and ``total_sequence_length`` (scalar int32)."""
    graph.constant("one_axis", np.array([1], np.int64))
    graph.constant("one_int32", np.array(1, np.int32))
    graph.constant("index_one", np.array(1, np.int64))
    graph.node("ReduceSum", ["attention_mask", "one_axis"], ["mask_sum"], "attn_mask", keepdims=0)
    graph.node("Cast", ["mask_sum"], ["mask_sum_int32"], "attn_mask", to=TensorProto.INT32)
    graph.node("Sub", ["mask_sum_int32", "one_int32"], ["seqlens_k"], "attn_mask")
    graph.node("Shape", ["attention_mask"], ["mask_shape"], "attn_mask")
    graph.node("Gather", ["mask_shape", "index_one"], ["total_length"], "attn_mask", axis=0)
    graph.node("Cast", ["total_length"], ["total_sequence_length"], "attn_mask_total", to=TensorProto.INT32)
    return "seqlens_k", "total_sequence_length"


def _heads(module: nn.Module, head_dim: int, what: str) -> int:
    width = module.out_features
    if width % head_dim:
        raise ExportError(f"{what} writes {width} features, not a whole number of {head_dim}-wide heads")
    return width // head_dim


def fused_decoder_graph(model: nn.Module) -> tuple[onnx.ModelProto, tuple[tuple[int, int], ...]]:
    """The fused graph of ``model`` (module docstring) and each kept block's (kv heads, head size)."""
    refusal = fusion_refusal(model)
    if refusal is not None:
        raise ExportError(f"cannot write a fused decoder: {refusal}")
    geometry = decoder_geometry(model)
    modules = dict(model.named_modules())
    graph = _Graph()
    cos, sin = _rotary_cache(geometry)
    graph.constant("cos_cache", cos)
    graph.constant("sin_cache", sin)
    seqlens, total = _sequence_lengths(graph)
    table = model.get_input_embeddings()
    table_name = next(n for n, m in modules.items() if m is table)
    graph.constant(f"{WRAPPED}.{table_name}.weight", _array(table.weight))
    hidden = f"/{WRAPPED}/{table_name}/output"
    graph.node("Gather", [f"{WRAPPED}.{table_name}.weight", "input_ids"], [hidden], table_name, axis=0)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])]
    outputs = []
    shapes = []
    residual: str | None = None
    head_dim, eps = geometry.head_dim, geometry.norm_eps
    for j, (key, _) in enumerate(block_list(model)[1].named_children()):
        block = f"model.layers.{key}"
        attn = f"{block}.self_attn"
        x, residual = _norm(graph, modules[f"{block}.input_layernorm"], f"{block}.input_layernorm", hidden, residual, eps)
        q_heads = _heads(modules[f"{attn}.q_proj"], head_dim, f"{attn}.q_proj")
        kv_heads = _heads(modules[f"{attn}.k_proj"], head_dim, f"{attn}.k_proj")
        if q_heads % kv_heads:
            raise ExportError(f"{attn}: {q_heads} query heads do not share {kv_heads} key/value heads evenly")
        q, k, v = (_linear(graph, modules[f"{attn}.{p}"], f"{attn}.{p}", x) for p in ("q_proj", "k_proj", "v_proj"))
        past = [PAST.format(j, kind) for kind in ("key", "value")]
        present = [PRESENT.format(j, kind) for kind in ("key", "value")]
        for name in past:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", kv_heads, "past_sequence",
                                                                                   head_dim]))
        for name in present:
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", kv_heads, "total_sequence",
                                                                                    head_dim]))
        window = geometry.sliding_windows[int(key)] if int(key) < len(geometry.sliding_windows) else None
        context = f"/{WRAPPED}/{attn}/context"
        scaling = float(getattr(modules[attn], "scaling", head_dim ** -0.5))
        graph.node("GroupQueryAttention", [q, k, v, *past, seqlens, total, "cos_cache", "sin_cache"],
                   [context, *present], attn, domain="com.microsoft", num_heads=q_heads, kv_num_heads=kv_heads,
                   do_rotary=1, rotary_interleaved=0, scale=scaling, local_window_size=-1 if window is None else window)
        attended = _linear(graph, modules[f"{attn}.o_proj"], f"{attn}.o_proj", context)
        post = f"{block}.post_attention_layernorm"
        y, residual = _norm(graph, modules[post], post, attended, residual, eps)
        mlp = f"{block}.mlp"
        gate = _linear(graph, modules[f"{mlp}.gate_proj"], f"{mlp}.gate_proj", y)
        up = _linear(graph, modules[f"{mlp}.up_proj"], f"{mlp}.up_proj", y)
        graph.node("Sigmoid", [gate], [f"/{WRAPPED}/{mlp}/sigmoid"], f"{mlp}.act_fn")
        graph.node("Mul", [gate, f"/{WRAPPED}/{mlp}/sigmoid"], [f"/{WRAPPED}/{mlp}/silu"], f"{mlp}.act_fn")
        graph.node("Mul", [f"/{WRAPPED}/{mlp}/silu", up], [f"/{WRAPPED}/{mlp}/gated"], mlp)
        hidden = _linear(graph, modules[f"{mlp}.down_proj"], f"{mlp}.down_proj", f"/{WRAPPED}/{mlp}/gated")
        shapes.append((kv_heads, head_dim))
    final, _ = _norm(graph, modules["model.norm"], "model.norm", hidden, residual, eps)
    head = model.get_output_embeddings()
    head_name = next(n for n, m in modules.items() if m is head)
    logits = _linear(graph, head, head_name, final)
    graph.node("Identity", [logits], ["logits"], f"{head_name}.output")
    vocab = head.out_features
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab]))
    proto = helper.make_model(
        helper.make_graph(graph.nodes, "slimtune_fused_decoder", inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", FUSED_OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="slimtune")
    proto.ir_version = 10
    return proto, tuple(shapes)


def export_fused_decoder(model: nn.Module, path: Path) -> Path:
    """Write ``model`` as a one-file fused ONNX decoder with a KV cache (module docstring)."""
    proto, _ = fused_decoder_graph(model)
    onnx.save_model(proto, str(path))
    return path


__all__ = ["MODEL_TYPES", "export_fused_decoder", "fused_decoder_graph", "fusion_refusal"]
