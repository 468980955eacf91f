"""Single-node models of the conv family, the onnx node test cases, and their comparisons.

Shared by the ConvTranspose, ConvInteger, QLinearConv and run-time-weight tests. A model is
built from its node's inputs in order: ``consts`` become initializers, the others graph
inputs (``dims`` overrides a declared shape; strings make dims symbolic).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, helper, numpy_helper


def node_model(op_type: str, inputs: list[tuple[str, np.ndarray | None]], consts=(),
               dims: dict | None = None, opset: int = 17, **attrs) -> ModelProto:
    """One ``op_type`` node named ``node`` reading ``inputs`` and writing ``Y``."""
    dims = dims or {}
    node = helper.make_node(op_type, [n if v is not None else "" for n, v in inputs], ["Y"],
                            name="node", **attrs)
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in inputs
             if v is not None and n in consts]
    declared = [helper.make_tensor_value_info(
        n, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype),
        list(dims.get(n, np.asarray(v).shape)))
        for n, v in inputs if v is not None and n not in consts]
    graph = helper.make_graph([node], "g", declared, [helper.make_empty_tensor_value_info("Y")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model).graph.output[0]
    if inferred.type.tensor_type.elem_type:
        model.graph.output[0].CopyFrom(inferred)
    else:  # inference gave up: the data input's element type and rank, dims unknown
        x = np.asarray(inputs[0][1])
        model.graph.output[0].CopyFrom(helper.make_tensor_value_info(
            "Y", helper.np_dtype_to_tensor_dtype(x.dtype), [None] * x.ndim))
    return model


def feeds_of(model: ModelProto, inputs: list[tuple[str, np.ndarray | None]]) -> dict:
    wanted = {i.name for i in model.graph.input}
    return {n: np.asarray(v) for n, v in inputs if n in wanted}


def run(model: ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnxruntime CPU, all optimizations, one thread; errors quiet (some cases expect them)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def op_types(model: ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


@dataclass(frozen=True)
class NodeCase:
    """One onnx node test: the model (weights are graph inputs), inputs and expected output."""

    name: str
    model: ModelProto
    feeds: dict
    expected: np.ndarray

    def with_initializers(self) -> tuple[ModelProto, dict]:
        """A copy whose inputs other than the first are initializers, and its one feed."""
        model = ModelProto()
        model.CopyFrom(self.model)
        first, *rest = model.graph.input
        model.graph.initializer.extend(
            numpy_helper.from_array(self.feeds[i.name], i.name) for i in rest)
        del model.graph.input[1:]
        return model, {first.name: self.feeds[first.name]}


@functools.cache
def _all_node_cases() -> tuple[NodeCase, ...]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # other ops' generators warn about overflows
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    found = []
    for case in cases:
        nodes = case.model.graph.node
        if len(nodes) != 1 or nodes[0].op_type not in (
                "Conv", "ConvTranspose", "ConvInteger", "QLinearConv"):
            continue
        inputs, outputs = case.data_sets[0]
        feeds = {i.name: np.asarray(v) for i, v in zip(case.model.graph.input, inputs)}
        found.append(NodeCase(case.name, case.model, feeds, np.asarray(outputs[0])))
    return tuple(found)


def node_cases(op_type: str) -> list[NodeCase]:
    """The onnx node tests of ``op_type``, rebuilt by ``collect_testcases`` (once per run)."""
    return [c for c in _all_node_cases() if c.model.graph.node[0].op_type == op_type]
