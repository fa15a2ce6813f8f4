"""Graph passes that never read weight values, run with the weights set aside.

ONNX's shape inference and version converter, and ONNX Runtime's quantizers, serialise the whole
model to hand it to C++ or to disk and parse it back: on MiniLM (90 MB of weights) one shape
inference took 1.7 s with the weights and 0.045 s without them (2-core Xeon VM, flags avx2 avx512f
avx512_vnni amx_int8; not measured on a CPU without AVX-512: the cost is copying bytes, so the ratio
is expected to hold there, not known to). Setting the
bytes of every large initializer aside (name, type and dims stay) and putting them back after the
pass gives the same model, byte for byte, since protobuf writes fields in a fixed order
(``tests/export/test_weightless.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

SET_ASIDE_BYTES = 1024  # initializers smaller than this stay: shape arithmetic reads small constants


def set_weights_aside(model: onnx.ModelProto, keep: frozenset[str] = frozenset()) -> dict[str, bytes]:
    """Clear the ``raw_data`` of every initializer of at least ``SET_ASIDE_BYTES`` in place, except
    those named in ``keep`` (weights the pass reads); returns them by name."""
    aside = {}
    for init in model.graph.initializer:
        if len(init.raw_data) >= SET_ASIDE_BYTES and init.name not in keep:
            aside[init.name] = init.raw_data
            init.ClearField("raw_data")
    return aside


def put_weights_back(model: onnx.ModelProto, aside: dict[str, bytes], as_reloaded: bool = False) -> onnx.ModelProto:
    """Refill the initializers of ``model`` that ``set_weights_aside`` emptied (those still present).

    ``as_reloaded``: mark them as a save to external data and reload marks every tensor it moved
    (``data_location`` written out as DEFAULT), for passes that would have taken them through one.
    """
    for init in model.graph.initializer:
        if init.name in aside and not init.raw_data and not init.float_data and init.data_location == onnx.TensorProto.DEFAULT:
            init.raw_data = aside[init.name]
            if as_reloaded:
                init.data_location = onnx.TensorProto.DEFAULT
    return model


def without_weights(graph_pass: Callable[[onnx.ModelProto], onnx.ModelProto],
                    model: onnx.ModelProto) -> onnx.ModelProto:
    """``graph_pass(model)`` run with the weights set aside; they are put back into its result and
    into ``model``, which is left as it was."""
    aside = set_weights_aside(model)
    try:
        result = graph_pass(model)
    finally:
        put_weights_back(model, aside)
    return put_weights_back(result, aside)
