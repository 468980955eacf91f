"""Small single-conv models and runners shared by the tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16,
          np.float64: TensorProto.DOUBLE}


def conv_model(x_shape, w, b=None, *, dims=None, opset=17, **attrs) -> onnx.ModelProto:
    """One Conv with initializer weights. ``dims`` overrides the declared input dims
    (strings make them symbolic)."""
    elem = DTYPES[w.dtype.type]
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["X", "W"]
    if b is not None:
        inits.append(numpy_helper.from_array(b, "B"))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["Y"], name="conv", **attrs)
    declared = list(dims) if dims is not None else list(x_shape)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", elem, declared)],
        [helper.make_tensor_value_info("Y", elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    if not model.graph.output[0].type.tensor_type.HasField("shape"):
        model.graph.output[0].type.tensor_type.shape.SetInParent()
    return model


def session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            ) -> ort.InferenceSession:
    """A one-thread CPU session with onnxruntime's warnings kept off the test output."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    return session(model, level).run(None, feeds)


def random_conv(rng, c, m, kernel, group=1, bias=True, dtype=np.float32):
    w = rng.standard_normal((m, c // group, *kernel)).astype(dtype)
    b = rng.standard_normal(m).astype(dtype) if bias else None
    return w, b
