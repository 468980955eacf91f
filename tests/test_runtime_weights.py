"""Convs whose weight or bias the graph computes at run time (graph inputs, dynamic filters).

They are lowered like the others, but the weight's reshape and transpose into ``B`` are
nodes feeding the MatMul, and the report marks the row ``weights="runtime"``: a weight-only
quantizer cannot take such a weight. ``skip_runtime_weights`` leaves them alone instead.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import onnx
import pytest
from convfamily import feeds_of, node_cases, node_model, op_types, run
from onnx import helper
from rich.console import Console

from onnx_convfc import rewrite_model

REL = 1e-4


def conv_with_inputs(op_type, x_shape, w_shape, *, bias=True, consts=(), dynamic=False,
                     **attrs):
    """``op_type`` whose weight and bias are graph inputs unless named in ``consts``."""
    rng = np.random.default_rng(zlib.crc32(repr((op_type, x_shape, w_shape, attrs)).encode()))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    out_channels = w_shape[0] if op_type == "Conv" else w_shape[1] * attrs.get("group", 1)
    b = rng.standard_normal(out_channels).astype(np.float32) if bias else None
    inputs = [("X", x), ("W", w), ("B", b)]
    dims = {"X": ["N", x_shape[1]] + [f"d{i}" for i in range(len(x_shape) - 2)]} \
        if dynamic else None
    model = node_model(op_type, inputs, consts=consts, dims=dims, **attrs)
    return model, feeds_of(model, inputs)


def lowered(model, **options):
    rewritten, report = rewrite_model(model, **options)
    (row,) = report.rows
    assert row.lowering, row.reason
    assert row.weights == "runtime"
    assert not op_types(rewritten) & {"Conv", "ConvTranspose"}
    onnx.checker.check_model(rewritten, full_check=True)
    return rewritten, row


def max_error(model, rewritten, feeds) -> float:
    ref, out = run(model, feeds)[0], run(rewritten, feeds)[0]
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max()) / max(1.0, float(np.abs(ref).max()))


def matmul_weights_are_computed(model) -> bool:
    """Every MatMul's B is produced by a node, none is an initializer."""
    inits = {t.name for t in model.graph.initializer}
    produced = {o for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    return bool(matmuls) and all(m.input[1] in produced - inits for m in matmuls)


CONV_CASES = {
    "1-D": ((2, 4, 9), (6, 4, 3), dict(pads=[1, 2], strides=[2])),
    "2-D": ((2, 4, 7, 6), (6, 4, 3, 2), dict(pads=[1, 0, 1, 1], dilations=[2, 1])),
    "3-D": ((1, 2, 4, 5, 3), (3, 2, 2, 3, 1), dict(strides=[1, 2, 1])),
    "1x1": ((2, 4, 5, 5), (6, 4, 1, 1), dict(strides=[2, 2])),
    "grouped": ((2, 4, 6, 6), (6, 2, 3, 3), dict(group=2, pads=[1, 1, 1, 1])),
    "depthwise": ((2, 4, 6, 6), (4, 1, 3, 3), dict(group=4, auto_pad="SAME_UPPER",
                                                   strides=[2, 2])),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_weight_and_bias_as_graph_inputs(case, dynamic):
    x_shape, w_shape, attrs = CONV_CASES[case]
    model, feeds = conv_with_inputs("Conv", x_shape, w_shape, dynamic=dynamic, **attrs)
    rewritten, row = lowered(model)
    assert row.lowering == ("pointwise" if case == "1x1" else "im2col")
    assert matmul_weights_are_computed(rewritten)
    assert max_error(model, rewritten, feeds) <= REL


def test_constant_weight_with_run_time_bias_is_marked():
    model, feeds = conv_with_inputs("Conv", (1, 3, 5, 5), (4, 3, 3, 3), consts=("W",))
    rewritten, row = lowered(model)
    assert row.weight_bytes_before == 4 * 3 * 3 * 3 * 4  # the constant weight only
    assert max_error(model, rewritten, feeds) <= REL


def test_weight_computed_from_an_input_by_nodes():
    """A dynamic filter: W = W0 * gain, with gain fed at run time."""
    model, feeds = conv_with_inputs("Conv", (1, 3, 6, 6), (4, 3, 3, 3), consts=("W", "B"),
                                    pads=[1, 1, 1, 1])
    model.graph.initializer[0].name = "W0"
    model.graph.node.insert(0, helper.make_node("Mul", ["W0", "gain"], ["W"], name="scale"))
    model.graph.input.append(helper.make_tensor_value_info("gain", onnx.TensorProto.FLOAT, [1]))
    feeds["gain"] = np.array([0.5], np.float32)
    rewritten, row = lowered(model)
    assert [n.op_type for n in rewritten.graph.node][0] == "Mul"
    assert max_error(model, rewritten, feeds) <= REL
    feeds["gain"] = np.array([-3.0], np.float32)  # a new filter at every call
    assert max_error(model, rewritten, feeds) <= REL


@pytest.mark.parametrize("case", [
    dict(strides=[2, 2]),
    dict(strides=[2, 1], pads=[1, 0, 1, 1], output_padding=[1, 0]),
    dict(strides=[3, 2], dilations=[1, 2], group=2),
])
def test_conv_transpose_weight_as_graph_input(case):
    w_shape = (4, 3, 3, 3) if case.get("group", 1) == 1 else (4, 2, 3, 3)
    model, feeds = conv_with_inputs("ConvTranspose", (2, 4, 5, 4), w_shape, dynamic=True, **case)
    rewritten, row = lowered(model)
    assert row.lowering == "subpixel"
    assert "Gather" in op_types(rewritten)  # the taps are placed by a Gather at run time
    assert max_error(model, rewritten, feeds) <= REL


@pytest.mark.parametrize("op_type", ["Conv", "ConvTranspose"])
def test_onnx_node_cases(op_type):
    cases = node_cases(op_type)
    assert cases
    for case in cases:
        rewritten, _ = lowered(case.model)
        np.testing.assert_allclose(run(rewritten, case.feeds)[0], case.expected, rtol=1e-5,
                                   atol=1e-5, err_msg=case.name)
        model, feeds = case.with_initializers()
        rewritten, report = rewrite_model(model)
        assert [r.weights for r in report.rows] == ["constant"]
        np.testing.assert_allclose(run(rewritten, feeds)[0], case.expected, rtol=1e-5,
                                   atol=1e-5, err_msg=case.name)


def test_split_groups_keeps_one_batched_matmul_for_run_time_weights():
    model, feeds = conv_with_inputs("Conv", (1, 4, 5, 5), (6, 2, 3, 3), group=2)
    rewritten, _ = lowered(model, split_groups=True)
    assert sum(n.op_type == "MatMul" for n in rewritten.graph.node) == 1
    assert max_error(model, rewritten, feeds) <= REL


@pytest.mark.parametrize("method", ["fc", "dense"])
def test_methods_without_a_run_time_form_take_the_auto_choice(method):
    model, feeds = conv_with_inputs("Conv", (1, 3, 3, 3), (4, 3, 3, 3))
    rewritten, row = lowered(model, method=method)
    assert row.lowering == "im2col"
    assert max_error(model, rewritten, feeds) <= REL


# ---------------------------------------------------------------- left alone, with reasons

def test_skip_runtime_weights_leaves_them_alone():
    model, _ = conv_with_inputs("Conv", (1, 3, 5, 5), (4, 3, 3, 3))
    rewritten, report = rewrite_model(model, skip_runtime_weights=True)
    assert report.rows[0].reason == "weight 'W' is not constant"
    assert op_types(rewritten) == {"Conv"}


def test_unknown_weight_shape_is_skipped_with_reason():
    model, _ = conv_with_inputs("Conv", (1, 3, 5, 5), (4, 3, 3, 3))
    weight = next(i for i in model.graph.input if i.name == "W")
    weight.type.tensor_type.shape.dim[0].dim_param = "M"
    _, report = rewrite_model(model)
    assert report.rows[0].reason == "weight 'W' is not constant and its shape is not known " \
                                    "statically"


# ---------------------------------------------------------------- report

def test_report_marks_run_time_rows():
    model, _ = conv_with_inputs("Conv", (1, 3, 5, 5), (4, 3, 3, 3))
    _, report = rewrite_model(model)
    assert report.to_dict()["convs"][0]["weights"] == "runtime"
    console = Console(file=io.StringIO(), width=200)
    report.render(console)
    assert "im2col (run-time weights)" in console.file.getvalue()
