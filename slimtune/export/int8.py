"""int8 Linears: ONNX Runtime's dynamic quantization (per-channel int8 weights, MatMul ->
DynamicQuantizeLinear + MatMulInteger), run on the graph in memory, its per-channel weight step
vectorised.

``quantize_dynamic``'s entry point saves the model, infers shapes from the file, reloads it, and
writes its result to disk to be read back; its weight step then quantizes one output channel at a
time in Python (20,736 calls for MiniLM's 36 Linears: 1.3 of the pass's 1.6 s). Here the same
steps run in memory (shape inference, the inference tag, the opset update, ``ONNXQuantizer``, the
topological sort before saving), and the weight step computes every channel's scale at once with
ONNX Runtime's own arithmetic: symmetric int8, scale = 2 * absmax / 254 in float64 stored as
float32, zero point 0, values rounded half to even and clipped. The graph is byte for byte what
the file path writes (``tests/transforms/test_contract_quant.py``); graphs of 1.8 GB or more take
the file path (protobuf serialises at most 2 GB). The passes run with the weights set aside
(``slimtune.export.weightless``): shape inference and the quantizer's own reload then handle the
graph alone, and the weight step reads each weight from the bytes set aside.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from slimtune.export.onnx_export import IN_MEMORY_LIMIT_BYTES
from slimtune.export.quantize import _names, _quiet
from slimtune.export.weightless import put_weights_back, set_weights_aside


def quantize_int8_matmuls(model: onnx.ModelProto, nodes: set[str]) -> onnx.ModelProto:
    """Per-channel int8 weights for the named MatMul nodes (MatMulInteger kernels)."""
    if not nodes:
        return model
    options = {"DefaultTensorType": TensorProto.FLOAT}  # shape inference types nothing behind a contrib op
    # (a fused decoder's attention): every activation here is fp32
    common = {"nodes_to_quantize": sorted(nodes), "nodes_to_exclude": sorted(_names(model, "MatMul") - nodes)}
    if sum(len(t.raw_data) for t in model.graph.initializer) < IN_MEMORY_LIMIT_BYTES:  # ByteSize() costs 0.15 s
        with _quiet():
            return _int8_in_memory(model, options, **common)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="slimtune-q8-") as tmp, _quiet():  # quiet its pre-processing advice
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                         extra_options=options, **common)
        return onnx.load(str(out))


def _quantizer_class(aside: dict[str, bytes]):
    """``aside``: the weights' bytes by name, for initializers emptied by ``set_weights_aside``."""
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer

    class ChannelsAtOnce(ONNXQuantizer):
        """ONNX Runtime's quantizer whose symmetric int8 per-channel weight step is vectorised."""

        def quantize_weight_per_channel_impl(self, weight_name, weight_qType, channel_axis,  # noqa: N803
                                             reduce_range=True, keep_float_weight=False):
            plain = (weight_qType == TensorProto.INT8 and self.is_weight_symmetric(weight_qType)
                     and not (self.reduce_range and reduce_range) and self.min_real_range is None
                     and self.tensor_quant_overrides.empty() and not keep_float_weight)
            initializer = next((i for i in self.model.initializer() if i.name == weight_name), None)
            set_aside = initializer is not None and not initializer.raw_data and weight_name in aside
            if not plain or initializer is None or initializer.data_type != TensorProto.FLOAT:
                if set_aside:
                    initializer.raw_data = aside[weight_name]
                return super().quantize_weight_per_channel_impl(weight_name, weight_qType, channel_axis,
                                                                reduce_range, keep_float_weight)
            weights = (np.frombuffer(aside[weight_name], "<f4").reshape(tuple(initializer.dims)) if set_aside
                       else onnx.numpy_helper.to_array(initializer))
            axis = channel_axis % weights.ndim
            scales, codes = int8_per_channel(weights, axis)
            names = (weight_name + "_quantized", weight_name + "_zero_point", weight_name + "_scale")
            count = [initializer.dims[axis]]
            self.model.initializer_extend([
                onnx.helper.make_tensor(names[2], initializer.data_type, count, scales.tolist()),
                onnx.helper.make_tensor(names[1], weight_qType, count, [0] * count[0]),
            ])
            self.model.initializer_extend([onnx.numpy_helper.from_array(codes.reshape(initializer.dims), names[0])])
            return names

    return ChannelsAtOnce


def int8_per_channel(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scale per channel along ``axis``, int8 codes): ONNX Runtime's symmetric int8
    per-channel quantization (``quant_utils.quantize_data``), every channel at once."""
    others = tuple(i for i in range(weights.ndim) if i != axis)
    absmax = np.abs(weights).max(axis=others) if weights.size else np.zeros(weights.shape[axis], np.float32)
    wide = absmax.astype(np.float64)
    scale = (wide - (-wide)) / (np.float64(127) - np.float64(-127))
    scales = np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale.astype(np.float32)).astype(np.float32)
    shape = [1] * weights.ndim
    shape[axis] = -1
    codes = (weights.astype(np.float32) / scales.reshape(shape)).round()
    np.clip(codes, -128, 127, out=codes)
    return scales, codes.astype(np.int8)


def _int8_in_memory(model: onnx.ModelProto, options: dict, nodes_to_quantize: list[str],
                    nodes_to_exclude: list[str]) -> onnx.ModelProto:
    """``quantize_dynamic(per_channel=True, weight_type=QInt8, op_types=["MatMul"])``'s steps, in memory."""
    from onnxruntime.quantization import QuantizationMode, QuantType
    from onnxruntime.quantization.quant_utils import add_infer_metadata, update_opset_version

    # Gemm weights stay: the quantizer transposes them into MatMuls (a classifier's head, a pooler)
    aside = set_weights_aside(model, frozenset(i for n in model.graph.node if n.op_type == "Gemm" for i in n.input))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    finally:
        put_weights_back(model, aside)
    add_infer_metadata(inferred)
    inferred = update_opset_version(inferred, QuantType.QInt8)
    quantizer = _quantizer_class(aside)(inferred, True, False, QuantizationMode.IntegerOps, False, QuantType.QInt8,
                                        QuantType.QUInt8, None, nodes_to_quantize, nodes_to_exclude, ["MatMul"],
                                        {**options, "MatMulConstBOnly": True})
    quantizer.quantize_model()
    quantizer.model.topological_sort()
    return put_weights_back(quantizer.model.model, aside, as_reloaded=True)  # the quantizer reloads them
