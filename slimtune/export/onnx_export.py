"""Export a (transformed) model to an fp32 ONNX graph: sentence embeddings or class logits.

The fastest graph ONNX Runtime gets from a transformer here comes from eager attention (plain
MatMul / Softmax, no SDPA masking and NaN-guard nodes) traced by the TorchScript exporter:
measured on MiniLM, 8x128 tokens, 2 threads, it ran fp32 in 0.83x and uniform int8 in 0.84x the
time of the torch.export graph with SDPA attention, and exported in 0.7 s instead of 4.5 s
(``benchmarks/toolbox.py`` compares it with Optimum's export). The torch.export-based exporter is
the fallback for models the tracer cannot handle.

Both exporters say which torch module produced each node: the TorchScript one in the node name
(``/model/encoder/layer.0/attention/self/query/MatMul``), torch.export in the node metadata
``pkg.torch.onnx.name_scopes``. That is how the quantization passes find each planned Linear.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
import torch
from torch import nn

from slimtune.errors import first_line
from slimtune.model import WRAPPED, OutputSpec, wrap_output

INPUT_NAMES = ("input_ids", "attention_mask")
EXPORT_ERROR_CHARS = 200  # how much of an exporter's error an ExportError quotes
OPSET = 17  # LayerNormalization as one node; 4-bit embedding tables raise it to 21 later
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_WRAPPER_PREFIX = f"{WRAPPED}."
Target = Path | BinaryIO  # where an exporter writes the graph: a file, or a buffer in memory
# Protobuf serialises at most 2 GB: graphs whose weights reach this go through files instead of memory.
IN_MEMORY_LIMIT_BYTES = 1_800_000_000


def target_arg(target: Target) -> str | BinaryIO:
    """What ``torch.onnx.export`` takes for ``target``."""
    return str(target) if isinstance(target, Path) else target


class ExportError(RuntimeError):
    """The model could not be exported to ONNX."""


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Compute attention with plain ops while exporting (the graph ONNX Runtime runs fastest), then restore.

    Switching in place and back spares a copy of the model in every trial's export.
    """
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before in (None, "eager") or not callable(getattr(model, "set_attn_implementation", None)):
        yield
        return
    try:
        model.set_attn_implementation("eager")
    except (ValueError, AttributeError):  # an architecture without an eager path keeps its own
        yield
        return
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def quiet_export(model: nn.Module) -> Iterator[None]:
    """Around one export of ``model``: eager attention (``_eager_attention``), the exporters' warnings,
    prints and ``torch.onnx`` log messages below errors kept out of the caller's output, all restored."""
    sink = io.StringIO()
    with (_eager_attention(model), warnings.catch_warnings(), contextlib.redirect_stdout(sink),
          contextlib.redirect_stderr(sink)):
        warnings.simplefilter("ignore")
        logger = logging.getLogger("torch.onnx")
        level, logger.level = logger.level, logging.ERROR
        try:
            yield
        finally:
            logger.setLevel(level)


def _torchscript_export(wrapper: nn.Module, sample: tuple[torch.Tensor, ...], target: Target, output_name: str) -> None:
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    torch.onnx.export(
        wrapper, sample, target_arg(target), input_names=list(INPUT_NAMES), output_names=[output_name],
        dynamic_axes={**axes, output_name: {0: "batch"}}, opset_version=OPSET, do_constant_folding=True,
        dynamo=False,
    )


def _dynamo_export(wrapper: nn.Module, sample: tuple[torch.Tensor, ...], target: Target, output_name: str) -> None:
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    program = torch.onnx.export(
        wrapper, sample, target if isinstance(target, Path) else None, input_names=list(INPUT_NAMES),
        output_names=[output_name], dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}), dynamo=True,
        external_data=False, optimize=True, verbose=False,
    )
    if not isinstance(target, Path):
        target.write(program.model_proto.SerializeToString())


EXPORTERS = {"torchscript": _torchscript_export, "dynamo": _dynamo_export}


def export_fp32(model: nn.Module, target: Target, output: OutputSpec = OutputSpec(), sample_length: int = 16) -> Target:
    """Write ``wrap_output(model, output)`` as one self-contained .onnx file or buffer (dynamic batch
    and length): (input_ids, attention_mask) -> ``output.name``.

    Tries the exporters in order (TorchScript first, see the module docstring); the error of the
    last one is raised when none succeeds.
    """
    wrapper = wrap_output(model, output).eval()
    sample = (torch.ones((2, sample_length), dtype=torch.long), torch.ones((2, sample_length), dtype=torch.long))
    errors = []
    for name, exporter in EXPORTERS.items():
        try:
            with quiet_export(model):
                exporter(wrapper, sample, target, output.name)
            return target
        except Exception as exc:  # the exporters raise many types; the cause is in the message
            errors.append(f"{name}: {first_line(exc, EXPORT_ERROR_CHARS)}")
    raise ExportError(f"ONNX export failed ({'; '.join(errors)})")


def node_module(node: onnx.NodeProto) -> list[str]:
    """Torch module paths (outermost first) that produced this node, without the pooling wrapper."""
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            scopes = ast.literal_eval(prop.value)  # written as a Python list of strings
            return [s.removeprefix(_WRAPPER_PREFIX) for s in scopes if s.startswith(_WRAPPER_PREFIX)]
    parts = node.name.strip("/").split("/")  # TorchScript: /model/<module path, '/'-separated>/<op>
    if len(parts) < 3 or parts[0] != _WRAPPER_PREFIX.rstrip("."):
        return []
    path = parts[1:-1]
    return [".".join(path[: i + 1]) for i in range(len(path))]


def weight_matmuls(model: onnx.ModelProto, module_names: set[str]) -> dict[str, str]:
    """MatMul node name -> planned module name, for MatMuls with a constant weight.

    The innermost scope that is a planned module wins, so both factors of a factorised Linear
    (``<name>.first`` and ``<name>.second``) map to ``<name>``.
    """
    constants = {init.name for init in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in constants:
            continue
        for scope in reversed(node_module(node)):
            if scope in module_names:
                found[node.name] = scope
                break
    return found
