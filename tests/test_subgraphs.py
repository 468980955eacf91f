"""Convs inside If/Loop/Scan bodies and model-local functions are rewritten, with weights
taken from the enclosing scope, and the result runs in onnxruntime like the original."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_convfc import rewrite_model

RNG = np.random.default_rng(7)
W3 = RNG.standard_normal((4, 4, 3, 3)).astype(np.float32)
W1 = RNG.standard_normal((4, 4, 1, 1)).astype(np.float32)
BIAS = RNG.standard_normal(4).astype(np.float32)
SHAPE = [1, 4, 6, 6]


def _value(name: str, shape=SHAPE, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _conv(x: str, w: str, y: str, name: str, bias: str | None = None, kernel: int = 3):
    """A conv that keeps the spatial size (``kernel`` 3 with pads 1, or 1)."""
    inputs = [x, w] + ([bias] if bias else [])
    return helper.make_node("Conv", inputs, [y], name=name, pads=[kernel // 2] * 4)


def _model(nodes, inputs, initializers=(), functions=(), extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, [_value("Y")], list(initializers))
    model = helper.make_model(graph, functions=list(functions), opset_imports=[
        helper.make_opsetid("", 17), *extra_opsets])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _outputs(model, feeds):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _all_ops(model) -> list[str]:
    ops = []

    def walk(nodes):
        for node in nodes:
            ops.append(node.op_type)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + \
                        list(attr.graphs):
                    walk(sub.node)

    walk(model.graph.node)
    for function in model.functions:
        walk(function.node)
    return ops


def _rewrite_and_compare(model, feed_list, expect_rewritten: int):
    out, report = rewrite_model(model)
    onnx.checker.check_model(out, full_check=True)
    assert len(report.rewritten) == expect_rewritten, [(r.node, r.reason) for r in report.rows]
    for feeds in feed_list:
        want, got = _outputs(model, feeds), _outputs(out, feeds)
        assert want.shape == got.shape
        err = float(np.abs(want - got).max())
        assert err <= 1e-4 * max(1.0, float(np.abs(want).max())), f"max_abs={err:.2e}"
    return out, report


def _x():
    return RNG.standard_normal(SHAPE).astype(np.float32)


def test_if_branches_use_outer_and_own_weights():
    then_branch = helper.make_graph([_conv("X", "W3", "t", "then_conv", "B")], "then", [],
                                    [_value("t")])
    else_branch = helper.make_graph([_conv("X", "W1_inner", "e", "else_conv", kernel=1)],
                                    "else", [], [_value("e")],
                                    [numpy_helper.from_array(W1, "W1_inner")])
    node = helper.make_node("If", ["cond"], ["Y"], name="if", then_branch=then_branch,
                            else_branch=else_branch)
    model = _model([node], [_value("X"), _value("cond", [], TensorProto.BOOL)],
                   [numpy_helper.from_array(W3, "W3"), numpy_helper.from_array(BIAS, "B")])
    x = _x()
    out, report = _rewrite_and_compare(
        model, [{"X": x, "cond": np.array(True)}, {"X": x, "cond": np.array(False)}], 2)
    assert {r.scope for r in report.rows} == {"main/if.then_branch", "main/if.else_branch"}
    assert "Conv" not in _all_ops(out)
    # the outer weight was only read by the branch: it is gone from the main graph
    assert "W3" not in {t.name for t in out.graph.initializer}


def test_loop_body_conv_with_outer_weight():
    body = helper.make_graph(
        [_conv("x_in", "W3", "conv_out", "loop_conv", "B"),
         helper.make_node("Relu", ["conv_out"], ["x_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [_value("i", [], TensorProto.INT64), _value("cond_in", [], TensorProto.BOOL),
                 _value("x_in")],
        [_value("cond_out", [], TensorProto.BOOL), _value("x_out")])
    trips = numpy_helper.from_array(np.array(3, dtype=np.int64), "trips")
    node = helper.make_node("Loop", ["trips", "", "X"], ["Y"], name="loop", body=body)
    model = _model([node], [_value("X")],
                   [trips, numpy_helper.from_array(W3, "W3"), numpy_helper.from_array(BIAS, "B")])
    out, report = _rewrite_and_compare(model, [{"X": _x()}], 1)
    assert report.rows[0].scope == "main/loop.body"
    assert "Conv" not in _all_ops(out)


def test_scan_body_conv():
    body = helper.make_graph(
        [_conv("frame", "W1", "frame_out", "scan_conv", kernel=1)], "body",
        [_value("frame")], [_value("frame_out")])
    node = helper.make_node("Scan", ["frames"], ["Y"], name="scan", body=body,
                            num_scan_inputs=1)
    frames = [3, *SHAPE]
    graph = helper.make_graph([node], "g", [_value("frames", frames)], [_value("Y", frames)],
                              [numpy_helper.from_array(W1, "W1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = {"frames": RNG.standard_normal(frames).astype(np.float32)}
    out, report = _rewrite_and_compare(model, [feeds], 1)
    assert report.rows[0].scope == "main/scan.body"


def test_nested_if_inside_loop():
    inner_then = helper.make_graph([_conv("x_in", "W3", "t", "deep_conv")], "then", [],
                                   [_value("t")])
    inner_else = helper.make_graph([helper.make_node("Identity", ["x_in"], ["e"])], "else", [],
                                   [_value("e")])
    body = helper.make_graph(
        [helper.make_node("If", ["cond_in"], ["x_out"], name="inner_if",
                          then_branch=inner_then, else_branch=inner_else),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [_value("i", [], TensorProto.INT64), _value("cond_in", [], TensorProto.BOOL),
                 _value("x_in")],
        [_value("cond_out", [], TensorProto.BOOL), _value("x_out")])
    trips = numpy_helper.from_array(np.array(2, dtype=np.int64), "trips")
    node = helper.make_node("Loop", ["trips", "go", "X"], ["Y"], name="loop", body=body)
    model = _model([node], [_value("X"), _value("go", [], TensorProto.BOOL)],
                   [trips, numpy_helper.from_array(W3, "W3")])
    out, report = _rewrite_and_compare(model, [{"X": _x(), "go": np.array(True)}], 1)
    assert report.rows[0].scope == "main/loop.body/inner_if.then_branch"


def test_weight_folded_in_outer_scope_for_a_branch_conv():
    """The weight is computed by a constant cone in the main graph, read inside a branch."""
    shape = numpy_helper.from_array(np.array(W3.shape, dtype=np.int64), "w_shape")
    flat = numpy_helper.from_array(W3.ravel(), "w_flat")
    reshape = helper.make_node("Reshape", ["w_flat", "w_shape"], ["W3_folded"], name="make_w")
    then_branch = helper.make_graph([_conv("X", "W3_folded", "t", "then_conv")], "then", [],
                                    [_value("t")])
    else_branch = helper.make_graph([helper.make_node("Identity", ["X"], ["e"])], "else", [],
                                    [_value("e")])
    node = helper.make_node("If", ["cond"], ["Y"], name="if", then_branch=then_branch,
                            else_branch=else_branch)
    model = _model([reshape, node], [_value("X"), _value("cond", [], TensorProto.BOOL)],
                   [shape, flat])
    out, report = _rewrite_and_compare(model, [{"X": _x(), "cond": np.array(True)}], 1)
    assert "Reshape" not in [n.op_type for n in out.graph.node]
    assert not {"w_flat", "w_shape", "W3_folded"} & {t.name for t in out.graph.initializer}
    assert any("folded 1 conv weight" in n for n in report.notes), report.notes


def test_weight_cone_inside_a_branch_is_folded():
    fill = helper.make_node("ConstantOfShape", ["w_shape"], ["w_ones"], name="fill",
                            value=numpy_helper.from_array(np.array([0.25], np.float32)))
    scale = helper.make_node("Mul", ["w_ones", "W3"], ["W3_inner"], name="scale")
    then_branch = helper.make_graph(
        [fill, scale, _conv("X", "W3_inner", "t", "then_conv")], "then", [], [_value("t")],
        [numpy_helper.from_array(np.array(W3.shape, dtype=np.int64), "w_shape")])
    else_branch = helper.make_graph([helper.make_node("Identity", ["X"], ["e"])], "else", [],
                                    [_value("e")])
    node = helper.make_node("If", ["cond"], ["Y"], name="if", then_branch=then_branch,
                            else_branch=else_branch)
    model = _model([node], [_value("X"), _value("cond", [], TensorProto.BOOL)],
                   [numpy_helper.from_array(W3, "W3")])
    out, _ = _rewrite_and_compare(model, [{"X": _x(), "cond": np.array(True)}], 1)
    branch = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert not {"Mul", "ConstantOfShape", "Conv"} & {n.op_type for n in branch.node}
    assert "w_shape" not in {t.name for t in branch.initializer}


def _function(weight_node, weight: str, extra_inputs=()):
    return helper.make_function(
        "local", "ConvRelu", ["x", *extra_inputs], ["y"],
        [*weight_node, helper.make_node("Conv", ["x", weight], ["c"], name="fn_conv",
                                        pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"])],
        opset_imports=[helper.make_opsetid("", 17)])


def test_local_function_conv_with_constant_weight():
    constant = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(W3))
    function = _function([constant], "w")
    call = helper.make_node("ConvRelu", ["X"], ["Y"], domain="local", name="call")
    model = _model([call], [_value("X")], functions=[function],
                   extra_opsets=[helper.make_opsetid("local", 1)])
    out, report = _rewrite_and_compare(model, [{"X": _x()}], 1)
    assert report.rows[0].scope == "function local.ConvRelu"
    assert "Conv" not in [n.op_type for n in out.functions[0].node]


def test_local_function_weight_cone_is_folded():
    values = helper.make_node("Constant", [], ["w_flat"], value_floats=W3.ravel().tolist())
    shape = helper.make_node("Constant", [], ["w_shape"],
                             value_ints=list(W3.shape))
    reshape = helper.make_node("Reshape", ["w_flat", "w_shape"], ["w"])
    function = _function([values, shape, reshape], "w")
    call = helper.make_node("ConvRelu", ["X"], ["Y"], domain="local", name="call")
    model = _model([call], [_value("X")], functions=[function],
                   extra_opsets=[helper.make_opsetid("local", 1)])
    out, _ = _rewrite_and_compare(model, [{"X": _x()}], 1)
    assert "Reshape" not in [n.op_type for n in out.functions[0].node]


def test_function_weight_from_a_formal_input_is_skipped_with_reason():
    function = _function([], "w", extra_inputs=["w"])
    call = helper.make_node("ConvRelu", ["X", "W3"], ["Y"], domain="local", name="call")
    model = _model([call], [_value("X")], [numpy_helper.from_array(W3, "W3")],
                   functions=[function], extra_opsets=[helper.make_opsetid("local", 1)])
    out, report = _rewrite_and_compare(model, [{"X": _x()}], 0)
    assert report.rows[0].reason.startswith("weight 'w' is not constant")
    assert out.functions[0] == model.functions[0]
