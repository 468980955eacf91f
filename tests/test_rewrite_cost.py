"""The shortcuts that make a rewrite cost about a load and a save (issue 7). Each must give
exactly what the longer way gave: the same bytes, the same shapes, the same folded weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from convmodels import conv_model
from onnx import TensorProto, helper, numpy_helper, version_converter
from onnx.defs import OpSchema

from onnx_convfc.batchnorm import Affine, fold
from onnx_convfc.emit import ConstantPool, NameScope
from onnx_convfc.graphs import GRAPH_OPS, TENSOR_OPS, inferred_shapes
from onnx_convfc.prepare import (
    MIN_OPSET,
    _compatible_upgrade,
    _relabelled,
    constants_from_inputs,
    fold_weight_cones,
    unknown_negative_dims,
)
from onnx_convfc.serialize import _large_constant_parts, model_chunks
from onnx_convfc.skeleton import weightless_copy

RNG = np.random.default_rng(11)
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ATTR = OpSchema.AttrType


def _standard_ops_with(*kinds) -> set[str]:
    return {schema.name for schema in onnx.defs.get_all_schemas_with_history()
            if schema.domain == "" and any(a.type in kinds for a in schema.attributes.values())}


def test_op_tables_match_the_onnx_schemas():
    assert GRAPH_OPS == _standard_ops_with(ATTR.GRAPH, ATTR.GRAPHS)
    assert TENSOR_OPS == _standard_ops_with(ATTR.TENSOR, ATTR.TENSORS, ATTR.SPARSE_TENSOR,
                                            ATTR.SPARSE_TENSORS)


# ---------------------------------------------------------------- opset upgrade

def _prepared_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The weightless model ``prepare`` hands the opset upgrade."""
    copy, store = weightless_copy(model)
    unknown_negative_dims(copy)
    constants_from_inputs(copy)
    fold_weight_cones(copy, store)
    return copy


@pytest.mark.parametrize("path", sorted(LIGHT.glob("light_*.onnx")), ids=lambda p: p.stem)
def test_compatible_upgrade_gives_what_the_converter_gives(path):
    skeleton = _prepared_skeleton(onnx.load(path))
    assert _compatible_upgrade(skeleton, 9)
    converted = version_converter.convert_version(skeleton, MIN_OPSET)
    assert _relabelled(skeleton).SerializeToString() == converted.SerializeToString()


def _opset_model(nodes, opset: int, value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w")],
        value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_compatible_upgrade_from_opset_10_with_declared_value_info():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2]),
             helper.make_node("Softmax", ["p"], ["y"])]
    declared = [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 2, 8, 8])]
    model = _opset_model(nodes, 10, declared)
    assert _compatible_upgrade(model, 10)
    converted = version_converter.convert_version(model, MIN_OPSET)
    assert _relabelled(model).SerializeToString() == converted.SerializeToString()


@pytest.mark.parametrize("node", [
    helper.make_node("Upsample", ["x", "s"], ["y"]),  # Upsample_9_10 rewrites it
    helper.make_node("Slice", ["x"], ["y"], starts=[0], ends=[1], axes=[0]),  # Slice_9_10
    helper.make_node("Relu", ["x"], ["y"], domain="com.example"),
    helper.make_node("NoSuchOp", ["x"], ["y"]),
])
def test_other_upgrades_go_through_the_converter(node):
    assert not _compatible_upgrade(_opset_model([node], 9), 9)


def test_an_opset_8_model_goes_through_the_converter():
    assert not _compatible_upgrade(_opset_model([helper.make_node("Relu", ["x"], ["y"])], 8), 8)


# ---------------------------------------------------------------- BatchNormalization folding

@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_folding_a_broadcast_weight_keeps_it_broadcast_with_the_same_values(dtype):
    bn = Affine(helper.make_node("BatchNormalization", [], ["y"]),
                RNG.uniform(0.1, 3.0, 8), RNG.standard_normal(8))
    weight = np.broadcast_to(dtype(0.37), (8, 4, 3, 3))
    folded, bias = fold(weight, None, bn)
    full, full_bias = fold(np.array(weight), None, bn)
    assert folded.tobytes() == full.tobytes() and bias.tobytes() == full_bias.tobytes()
    assert folded.strides[1:] == (0, 0, 0)  # one value per output channel stored


def test_folding_rounds_once_like_a_float64_product():
    bn = Affine(helper.make_node("BatchNormalization", [], ["y"]),
                RNG.uniform(0.1, 3.0, 16), RNG.standard_normal(16))
    weight = RNG.standard_normal((16, 8, 3, 3)).astype(np.float16)
    folded, _ = fold(weight, None, bn)
    want = (weight.astype(np.float64) * bn.scale.reshape(-1, 1, 1, 1)).astype(np.float16)
    assert folded.tobytes() == want.tobytes()


def test_folding_refuses_an_overflowing_broadcast_weight():
    bn = Affine(helper.make_node("BatchNormalization", [], ["y"]), np.full(4, 1e6),
                np.zeros(4))
    assert fold(np.broadcast_to(np.float16(100), (4, 2, 1, 1)), None, bn) is None


# ---------------------------------------------------------------- serialising

def _constant_node(**extra) -> onnx.NodeProto:
    tensor = numpy_helper.from_array(RNG.standard_normal((64, 64)).astype(np.float32), "v")
    tensor.doc_string = "tensor doc"
    node = helper.make_node("Constant", [], ["c"], name="const", value=tensor, **extra)
    node.attribute[0].doc_string = "attribute doc"
    return node


@pytest.mark.parametrize("extra", [{}, {"doc_string": "node doc", "domain": "ai.onnx"}])
def test_a_large_constant_is_written_as_protobuf_writes_it(extra):
    node = _constant_node(**extra)
    assert b"".join(_large_constant_parts(node)) == node.SerializeToString()


def test_a_model_with_a_large_constant_round_trips():
    node = _constant_node()
    graph = helper.make_graph([node, helper.make_node("MatMul", ["x", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    parsed = onnx.ModelProto()
    parsed.ParseFromString(b"".join(model_chunks(model)))
    assert parsed == model


# ---------------------------------------------------------------- shapes and constants

def _eager_shapes(graph: onnx.GraphProto) -> dict:
    """What ``inferred_shapes`` gave before it read shapes on demand."""
    shapes = {}
    for each in [graph, *(a.g for n in graph.node for a in n.attribute if a.HasField("g"))]:
        shapes.update((t.name, tuple(t.dims)) for t in each.initializer)
        for value in (*each.input, *each.value_info, *each.output):
            t = value.type.tensor_type
            if t.HasField("shape"):
                shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                           for d in t.shape.dim)
    return shapes


def test_shapes_of_the_names_asked_for_match_reading_them_all():
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = conv_model([1, 3, 8, 8], w, dims=["n", 3, "h", "w"], pads=[1, 1, 1, 1])
    branch = helper.make_graph([helper.make_node("Relu", ["Y"], ["r"])], "b", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch,
                                             else_branch=branch))
    model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, None))
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    want = _eager_shapes(inferred.graph)
    got = inferred_shapes(model)
    assert got == want and got["cond"] == ()
    assert got["W"] == (4, 3, 3, 3)  # the input declares no shape: the initializer's dims
    some = inferred_shapes(model, names={"X", "W", "r", "nowhere"})
    assert some == {name: want[name] for name in ("X", "W", "r")}


def test_fixing_input_shapes_leaves_a_weightless_model_as_it_was():
    model = conv_model([1, 3, 8, 8], RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
                       dims=["n", 3, "h", "w"])
    model.graph.input.append(onnx.ValueInfoProto(name="untyped"))
    before = model.SerializeToString()
    shapes = inferred_shapes(model, [("X", (2, 3, 10, 12)), ("untyped", (1,))],
                             weightless=True)
    assert shapes["X"] == (2, 3, 10, 12) and shapes["Y"] == (2, 4, 8, 10)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.int64),  # small: its bytes are its key
    RNG.standard_normal((96, 128)).astype(np.float32),  # large: a hashed sample
    np.ascontiguousarray(RNG.standard_normal((128, 96)).astype(np.float32)).T,  # a view
    np.broadcast_to(np.float32(2), (64, 300)),
], ids=["small", "large", "transposed", "broadcast"])
def test_identical_constants_are_stored_once(array):
    graph = onnx.GraphProto()
    pool = ConstantPool(NameScope(), graph)
    first = pool.add("a", array)
    assert pool.add("b", np.array(array)) == first
    changed = np.array(array)
    changed.flat[-1] += 1
    assert pool.add("c", changed) != first
    assert [t.name for t in graph.initializer] == [first, "c"]

