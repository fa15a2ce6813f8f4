"""Export a (transformed) encoder to an fp32 ONNX sentence-embedding graph.

Uses the torch.export-based ONNX exporter. It names nodes generically, but records the torch
module path of each node in the metadata ``pkg.torch.onnx.name_scopes``; that is how the
quantization passes find the MatMul of each planned Linear.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from slimtune.model import MeanPooledEncoder

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_WRAPPER_PREFIX = "encoder."


class ExportError(RuntimeError):
    """The model could not be exported to ONNX."""


def export_fp32(encoder: nn.Module, path: Path, sample_length: int = 16) -> Path:
    """Write ``MeanPooledEncoder(encoder)`` as one self-contained .onnx file (dynamic batch and length)."""
    wrapper = MeanPooledEncoder(encoder).eval()
    ids = torch.ones((2, sample_length), dtype=torch.long)
    mask = torch.ones((2, sample_length), dtype=torch.long)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = ({0: batch, 1: length}, {0: batch, 1: length})
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            torch.onnx.export(
                wrapper, (ids, mask), str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_shapes=shapes, dynamo=True, external_data=False, optimize=True, verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; the cause is in the message
            raise ExportError(f"ONNX export failed: {str(exc).splitlines()[0][:300]}") from exc
    return path


def node_module(node: onnx.NodeProto) -> list[str]:
    """Torch module paths (outermost first) that produced this node, without the pooling wrapper."""
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            scopes = ast.literal_eval(prop.value)  # written as a Python list of strings
            return [s.removeprefix(_WRAPPER_PREFIX) for s in scopes if s.startswith(_WRAPPER_PREFIX)]
    return []


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
