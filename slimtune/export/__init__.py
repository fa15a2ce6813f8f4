"""Build the artifact a plan describes: the ONNX file whose bytes and kernels are the compression.

plan -> structural transforms (torch) -> fp32 ONNX export -> quantization passes (ONNX) -> file.
Every planned Linear must be found in the graph; a quantization that cannot be applied is an
error, never a silently uncompressed layer.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper
from torch import nn

from slimtune.export.decoder import KV_CACHE_KEY, export_decoder, input_table_name, share_tied_lm_head
from slimtune.export.fused_decoder import fused_decoder_graph, fusion_refusal
from slimtune.export.int8 import quantize_int8_matmuls
from slimtune.export.modes import EXACT, KernelModes
from slimtune.export.onnx_export import (
    IN_MEMORY_LIMIT_BYTES,
    ExportError,
    Target,
    export_fp32,
    weight_matmuls,
)
from slimtune.export.pack import pack_attention_projections
from slimtune.export.quantize import (
    BLOCKWISE_BITS,
    calibration_feeds,
    quantize_blockwise_matmuls,
    quantize_embedding,
)
from slimtune.export.size import artifact_bytes, predict_size_bytes
from slimtune.export.verify import verify_quantized, weight_nodes
from slimtune.model import WRAPPED, OutputSpec
from slimtune.plan import CompressionPlan
from slimtune.transforms import Calibration, apply_structural
from slimtune.transforms.distill import recover


def _traced_graph(model: nn.Module, write: Callable[[Target], Target], scratch: Path) -> onnx.ModelProto:
    """The graph ``write`` traces from ``model``: into memory, or through the file ``scratch`` (then
    removed) when the weights reach ``IN_MEMORY_LIMIT_BYTES``. The same graph either way: the tracer
    writes the same bytes. Writing MiniLM's fp32 file and reading it back made its export 0.72-1.81 s
    against 0.65-0.75 s in memory (2-core Xeon VM, flags avx2 avx512f avx512_vnni amx_int8; the
    difference is writing and reading the file, which a faster disk shrinks; not measured elsewhere)."""
    if sum(p.numel() * p.element_size() for p in model.parameters()) >= IN_MEMORY_LIMIT_BYTES:
        try:
            return onnx.load(str(write(scratch)))
        finally:
            scratch.unlink(missing_ok=True)
    buffer = io.BytesIO()
    write(buffer)
    return onnx.load_from_string(buffer.getvalue())


# How a (transformed) model becomes its fp32 graph, by name: (model, output, scratch file) -> graph;
# ``exporter_for`` picks one (every trial records which).
EXPORTERS: dict[str, Callable[[nn.Module, OutputSpec, Path], onnx.ModelProto]] = {
    "fused-decoder": lambda model, output, scratch: fused_decoder_graph(model)[0],
    "traced-decoder": lambda model, output, scratch: _traced_graph(model, lambda t: export_decoder(model, t), scratch),
    "traced": lambda model, output, scratch: _traced_graph(model, lambda t: export_fp32(model, t, output), scratch),
}


def exporter_for(model: nn.Module, output: OutputSpec) -> str:
    """The exporter of ``EXPORTERS`` for a (transformed) model: a causal LM of a family with a fused
    adapter (``fused_decoder.MODEL_TYPES``) gets the fused decoder, any other causal LM its traced
    forward with a cache, encoders and classifiers the traced export."""
    if output.kind != "lm":
        return "traced"
    return "fused-decoder" if fusion_refusal(model) is None else "traced-decoder"


@dataclass(frozen=True)
class Artifact:
    """One exported candidate. ``kernels`` counts op types in the final graph; ``exporter`` names the
    entry of ``EXPORTERS`` that wrote its fp32 graph."""

    path: Path
    plan: CompressionPlan
    kernels: Mapping[str, int]
    export_s: float
    quantize_s: float
    recover_s: float = 0.0
    recover_steps: int = 0
    compress_s: float = 0.0
    exporter: str = "traced"

    @property
    def matmul_kernels(self) -> dict[str, int]:
        """Counts of the matrix-multiply kernels: MatMul (fp32), MatMulInteger (int8), MatMulNBits (4/2-bit)."""
        return {k: v for k, v in self.kernels.items() if k in ("MatMul", "MatMulInteger", "MatMulNBits")}

    @property
    def build_s(self) -> float:
        """Seconds spent building (transforms, recovery, export, quantization), waits excluded."""
        return self.compress_s + self.recover_s + self.export_s + self.quantize_s

    @property
    def size_bytes(self) -> int:
        return artifact_bytes(self.path)


def kernel_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(node.op_type for node in model.graph.node))


def _quantize(proto: onnx.ModelProto, model: nn.Module, plan: CompressionPlan,
              calibration: Calibration | None = None, modes: KernelModes = EXACT,
              hold: Callable[[], AbstractContextManager] = nullcontext) -> onnx.ModelProto:
    """Apply the plan's quantization passes to the fp32 graph, then verify every layer's kernel.

    Order: embedding tables (a 4-bit table converts the graph to opset 21 first), int8 Linears,
    then one blockwise pass per (format, block size, method) with every other MatMul excluded, in
    the kernel ``modes`` of its bit width. GPTQ measures its Hessians on ``calibration``'s texts.
    ``hold`` is entered around each pass (GPTQ's: each of its steps).
    """
    embeddings = {n for n in plan.quantize if isinstance(model.get_submodule(n), nn.Embedding)}
    linears = set(plan.quantize) - embeddings
    before = weight_nodes(proto)
    node_of = weight_matmuls(proto, linears)
    missing = linears - set(node_of.values())
    if missing:
        raise ExportError(f"no MatMul found in the exported graph for {sorted(missing)[:3]}; cannot quantize them")
    tables = {f"{WRAPPED}.{name}.weight": (name, plan.quantize[name]) for name in embeddings}
    for table, (_, spec) in sorted(tables.items()):
        with hold():
            proto = quantize_embedding(proto, table, spec.format, spec.block_size, spec.method)
    int8 = {node for node, name in node_of.items() if plan.quantize[name].format == "int8"}
    with hold():
        proto = quantize_int8_matmuls(proto, int8)
    groups: dict[tuple[str, int, str], set[str]] = {}
    for node, name in node_of.items():
        spec = plan.quantize[name]
        if spec.is_blockwise:
            groups.setdefault((spec.format, spec.block_size, spec.method), set()).add(node)
    feeds = None
    if any(method == "gptq" for _, _, method in groups):
        if calibration is None or calibration.input_ids is None or calibration.attention_mask is None:
            raise ExportError("the plan quantizes with GPTQ, which needs calibration texts: pass "
                              "calibration=collect_calibration(model, ids, mask) to build_artifact")
        feeds = calibration_feeds(calibration.input_ids, calibration.attention_mask)
    for (weight_format, block, method), nodes in sorted(groups.items()):
        bits = BLOCKWISE_BITS[weight_format]
        proto = quantize_blockwise_matmuls(proto, nodes, bits, block, method, feeds, accuracy_level=modes.level(bits),
                                           symmetric=modes.is_symmetric(bits), hold=hold)
    with hold():
        verify_quantized(proto, before, {node: (name, plan.quantize[name]) for node, name in node_of.items()}, tables)
    return proto


def strip_debug_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's per-node debug metadata and intermediate shape annotations: not shipped.

    ONNX Runtime infers intermediate shapes itself; the annotations only add bytes.
    """
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    return model


def build_artifact(model: nn.Module, plan: CompressionPlan, path: Path, calibration: Calibration | None = None,
                   output: OutputSpec = OutputSpec(), hold: Callable[[], AbstractContextManager] = nullcontext,
                   modes: KernelModes = EXACT) -> Artifact:
    """Transform ``model`` by ``plan`` and write the deployable ONNX file at ``path``, returning ``output``
    (pooled embeddings by default, the model's class logits, or a causal LM's next-token logits
    with a KV cache: ``slimtune.export.decoder``).

    ``hold`` is entered around each stage (transforms, recovery, export) and each quantization pass
    (GPTQ's steps): a trial passes its shared node lock, so a waiting latency measurement gets the
    cores between them.
    Timings (s): ``compress_s`` the structural transforms, ``recover_s`` the distillation recovery,
    ``export_s`` the fp32 export, ``quantize_s`` the graph passes; waits for ``hold`` not included.
    ``modes``: how the blockwise kernels run (``slimtune.export.modes``; the bytes depend on them).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    waited = [0.0]

    @contextlib.contextmanager
    def held() -> Iterator[None]:  # ``hold``, its wait counted apart
        asked = time.perf_counter()
        with hold():
            waited[0] += time.perf_counter() - asked
            yield

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:  # its time, less the waits for ``hold`` within it
        started, before = time.perf_counter(), waited[0]
        yield
        seconds[name] = time.perf_counter() - started - (waited[0] - before)

    with stage("compress"), held():
        transformed = apply_structural(model, plan, calibration)
    steps = 0
    if plan.recovery is not None:
        with stage("recover"), held():
            transformed, steps = recover(model, transformed, plan, calibration, output)
    exporter = exporter_for(transformed, output)
    with stage("export"), held():
        fp32 = EXPORTERS[exporter](transformed, output, path.with_name(path.stem + ".fp32.onnx"))
    with stage("quantize"):  # held pass by pass (a GPTQ pass step by step): each can take seconds
        proto = _quantize(fp32, model, plan, calibration, modes, held)
    with stage("quantize_rest"), held():
        table = input_table_name(model) if output.kind == "lm" else None
        if table is not None:
            proto = share_tied_lm_head(proto, table)
        if exporter == "fused-decoder":
            proto = pack_attention_projections(proto)
        if output.kind == "lm":  # read by the generation timing: no need to parse the file again
            helper.set_model_props(proto, {KV_CACHE_KEY: "shared-buffer" if exporter == "fused-decoder"
                                           else "concatenated"})
        onnx.save_model(strip_debug_info(proto), str(path))
    return Artifact(path=path, plan=plan, kernels=kernel_counts(proto), export_s=seconds["export"],
                    quantize_s=seconds["quantize"] + seconds["quantize_rest"], recover_s=seconds.get("recover", 0.0),
                    recover_steps=steps,
                    compress_s=seconds["compress"], exporter=exporter)


__all__ = ["EXACT", "EXPORTERS", "Artifact", "KernelModes", "ExportError", "build_artifact", "exporter_for", "kernel_counts",
           "predict_size_bytes"]
