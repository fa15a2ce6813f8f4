"""Export a (transformed) causal LM as one ONNX graph with a KV cache: prefill and decode alike.

Graph signature (what ONNX Runtime GenAI and Optimum decoders take too):

* inputs ``input_ids`` (batch, sequence), ``attention_mask`` (batch, past + sequence), and per kept
  block j ``past_key_values.{j}.key`` / ``.value`` (batch, kv_heads_j, past, head_dim);
* outputs ``logits`` (batch, sequence, vocab) and ``present.{j}.key`` / ``.value`` (batch,
  kv_heads_j, past + sequence, head_dim).

A past of length 0 makes it a plain forward over whole windows (what quality scoring runs, and
time to first token); feeding the presents back with one new token is a decode step. Positions
are ``past + 0 .. sequence - 1``: sequences are unpadded or right-padded (batch-1 generation and
full text windows are). Each block keeps its own key/value head count, so plans that prune heads
per block export as they are (``kv_heads_j`` is fixed per input). The model's own forward is
traced (eager attention, TorchScript exporter: plain MatMul/Softmax ops that ONNX Runtime runs
well) with a ``DynamicCache`` built from the past inputs, so every architecture transformers
runs with a cache (Llama, Qwen2, Mistral, ...) exports by the same code.

Tied input and output embeddings: the exporter writes the LM head as its own transposed copy of
the table. ``share_tied_lm_head`` points it back at the table when both stay fp32, so the file
holds the table once, as the original model does.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from slimtune.errors import first_line
from slimtune.export.onnx_export import (
    EXPORT_ERROR_CHARS,
    OPSET,
    ExportError,
    Target,
    quiet_export,
    target_arg,
)
from slimtune.layout import block_list
from slimtune.model import WRAPPED

PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"
KV_CACHE_KEY = "slimtune.kv_cache"  # model metadata: "shared-buffer" (GroupQueryAttention) or "concatenated"


def cache_layer_indices(model: nn.Module) -> tuple[int, ...]:
    """The cache index of each block still in ``model``: its attention's ``layer_idx`` (blocks keep
    their original index after depth pruning), else its position."""
    _, blocks = block_list(model)
    indices = []
    for position, block in enumerate(blocks):
        found = [m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        indices.append(found[0] if found else position)
    return tuple(indices)


class CachedDecoder(nn.Module):
    """(input_ids, attention_mask, *past) -> (logits, *presents) over the model's own forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # the attribute name prefixes ONNX node names (slimtune.model.WRAPPED)
        self.layers = cache_layer_indices(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for j, index in enumerate(self.layers):
            cache.update(past[2 * j], past[2 * j + 1], index)
        # A removed block's slot holds a one-head stand-in of the same past length: the causal mask
        # reads the past length from the first slot, which depth pruning may have emptied.
        for index in sorted(set(range(max(self.layers) + 1)) - set(self.layers)):
            cache.update(past[0][:, :1], past[1][:, :1], index)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0) + past[0].shape[2]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=cache, use_cache=True)
        presents = []
        for index in self.layers:
            layer = out.past_key_values.layers[index]
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def kv_shapes(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """(kv_heads, head_dim) of each kept block's cache, from one short forward pass."""
    with torch.no_grad():
        out = model(input_ids=torch.ones((1, 2), dtype=torch.long), use_cache=True)
    return tuple((int(out.past_key_values.layers[i].keys.shape[1]), int(out.past_key_values.layers[i].keys.shape[3]))
                 for i in cache_layer_indices(model))


def io_names(layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"] + [PAST.format(j, kind) for j in range(layers) for kind in ("key", "value")]
    outputs = ["logits"] + [PRESENT.format(j, kind) for j in range(layers) for kind in ("key", "value")]
    return inputs, outputs


def export_decoder(model: nn.Module, target: Target, past_length: int = 3, new_length: int = 5) -> Target:
    """Write ``model`` (a ...ForCausalLM) as a one-file ONNX decoder with a KV cache (module docstring),
    to a file or a buffer."""
    shapes = kv_shapes(model)
    wrapper = CachedDecoder(model).eval()
    past = [torch.zeros((1, heads, past_length, dim)) for heads, dim in shapes for _ in ("key", "value")]
    sample = (torch.ones((1, new_length), dtype=torch.long), torch.ones((1, past_length + new_length), dtype=torch.long),
              *past)
    inputs, outputs = io_names(len(shapes))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in inputs[2:]})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in outputs[1:]})
    try:
        with quiet_export(model):
            torch.onnx.export(wrapper, sample, target_arg(target), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                              opset_version=OPSET, do_constant_folding=True, dynamo=False)
    except Exception as exc:  # the exporter raises many types; the cause is in the message
        raise ExportError(f"ONNX export of the causal LM with a KV cache failed ({first_line(exc, EXPORT_ERROR_CHARS)})") from exc
    return target


def is_decoder(model_inputs: list) -> bool:
    """True for a graph with a KV cache (inputs named ``past_key_values.*``); ``model_inputs``: an ONNX
    Runtime session's ``get_inputs()``."""
    return any(i.name.startswith("past_key_values.") for i in model_inputs)


def with_empty_past(model_inputs: list, feeds: dict[str, np.ndarray], head_dim: int | None = None) -> dict[str, np.ndarray]:
    """``feeds`` plus a zero-length past for every cache input of the graph that it lacks: a plain
    forward over whole sequences. ``model_inputs``: an ONNX Runtime session's ``get_inputs()``;
    ``head_dim``: the head size for graphs that leave it symbolic (slimtune's graphs fix it)."""
    missing = [i for i in model_inputs if i.name.startswith("past_key_values.") and i.name not in feeds]
    if not missing:
        return feeds
    batch = len(feeds["input_ids"])

    def size(dim) -> int:
        if isinstance(dim, int):
            return dim
        if head_dim is None:
            raise ValueError(f"the graph leaves the cache's head size symbolic ({dim!r}): pass head_dim")
        return head_dim

    extra = {i.name: np.zeros((batch, int(i.shape[1]), 0, size(i.shape[3])), np.float32) for i in missing}
    return {**feeds, **extra}


def input_table_name(model: nn.Module) -> str | None:
    """The ONNX initializer name of the model's token embedding table, if it has one."""
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    names = {id(m): n for n, m in model.named_modules()}
    return f"{WRAPPED}.{names[id(table)]}.weight" if table is not None and id(table) in names else None


def share_tied_lm_head(model: onnx.ModelProto, table_name: str) -> onnx.ModelProto:
    """Make an fp32 LM-head MatMul that multiplies by a transposed copy of the fp32 table ``table_name``
    read the table through a Transpose node instead, and drop the copy (the file holds it once).

    Unchanged when the table or the head is quantized, or the head is not a copy of the table.
    """
    inits = {init.name: init for init in model.graph.initializer}
    if table_name not in inits:
        return model
    table = numpy_helper.to_array(inits[table_name])
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or tuple(weight.dims) != table.shape[::-1]:
            continue
        if not np.array_equal(numpy_helper.to_array(weight), table.T):
            continue
        transposed = f"{table_name}_transposed"
        users = [n for n in model.graph.node if weight.name in n.input]
        for user in users:
            for k, name in enumerate(user.input):
                if name == weight.name:
                    user.input[k] = transposed
        position = list(model.graph.node).index(node)
        model.graph.node.insert(position, helper.make_node("Transpose", [table_name], [transposed],
                                                           name=f"/{WRAPPED}/lm_head/tied_transpose", perm=[1, 0]))
        model.graph.initializer.remove(weight)
        break
    return model
