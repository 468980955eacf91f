"""ConvInteger lowered to zero-point-padded patches and MatMulInteger: bit-exact int32.

Against onnxruntime's ConvInteger where it runs (per-tensor weight zero point), against an
exact numpy reference for per-channel weight zero points (onnxruntime refuses those), and
against the onnx node test cases.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
from convfamily import feeds_of, node_cases, node_model, op_types, run

from onnx_convfc import rewrite_model

DTYPES = {"u8": np.uint8, "i8": np.int8}


def integer_model(x_shape, m, kernel, *, types=("u8", "u8"), group=1, per_channel=False,
                  zero_points=True, runtime=False, dynamic=False, **attrs):
    """One ConvInteger with seeded random data and non-zero zero points."""
    rng = np.random.default_rng(zlib.crc32(repr((x_shape, m, kernel, types, group, attrs))
                                           .encode()))
    xt, wt = (DTYPES[t] for t in types)
    x = rng.integers(np.iinfo(xt).min, np.iinfo(xt).max, x_shape, endpoint=True).astype(xt)
    w = rng.integers(np.iinfo(wt).min, np.iinfo(wt).max, (m, x_shape[1] // group, *kernel),
                     endpoint=True).astype(wt)
    x_zp = np.array(rng.integers(np.iinfo(xt).min, np.iinfo(xt).max), xt)
    w_zp = (rng.integers(-20, 20, m) + (128 if wt == np.uint8 else 0)).astype(wt) \
        if per_channel else np.array(rng.integers(-20, 20) + (128 if wt == np.uint8 else 0), wt)
    inputs = [("X", x), ("W", w)] + ([("x_zp", x_zp), ("w_zp", w_zp)] if zero_points else [])
    dims = {"X": ["N", x_shape[1]] + [f"d{i}" for i in range(len(kernel))]} if dynamic else None
    model = node_model("ConvInteger", inputs, consts=() if runtime else ("W", "x_zp", "w_zp"),
                       dims=dims, opset=17, group=group, **attrs)
    return model, feeds_of(model, inputs), dict(inputs)


def lower(model, weights="constant"):
    rewritten, report = rewrite_model(model)
    (row,) = report.rows
    assert (row.op_type, row.lowering, row.weights) == ("ConvInteger", "im2col-integer", weights)
    assert "ConvInteger" not in op_types(rewritten) and "MatMulInteger" in op_types(rewritten)
    return rewritten


def assert_exact(out: np.ndarray, ref: np.ndarray) -> None:
    assert out.dtype == np.int32 and out.shape == ref.shape
    diff = np.abs(out.astype(np.int64) - ref.astype(np.int64))
    assert diff.max(initial=0) == 0, f"{np.count_nonzero(diff)} values differ, max {diff.max()}"


def numpy_conv_integer(values: dict, reference_conv, strides, dilations, pads, group):
    """Exact integer reference: float64 holds these sums exactly."""
    w = values["W"].astype(np.float64)
    w_zp = values.get("w_zp", np.zeros(()))
    w = w - np.asarray(w_zp, np.float64).reshape(-1, *[1] * (w.ndim - 1))
    x = values["X"].astype(np.float64) - float(values.get("x_zp", 0))
    return reference_conv(x, w, None, strides, dilations, pads, group)


GEOMETRIES = {
    "3x3 pads": dict(kernel=(3, 3), pads=[1, 1, 1, 1]),
    "asymmetric pads, stride": dict(kernel=(3, 2), pads=[2, 0, 1, 1], strides=[2, 3]),
    "dilated": dict(kernel=(3, 3), dilations=[2, 1], pads=[2, 1, 2, 1]),
    "1x1 stride 2": dict(kernel=(1, 1), strides=[2, 2]),
    "SAME_UPPER stride 2": dict(kernel=(3, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
    "SAME_LOWER": dict(kernel=(4, 4), auto_pad="SAME_LOWER"),
    "grouped": dict(kernel=(3, 3), group=2, pads=[1, 1, 1, 1]),
    "depthwise": dict(kernel=(3, 3), group=4, pads=[1, 1, 1, 1], strides=[2, 1]),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", GEOMETRIES)
def test_matches_onnxruntime_bit_exact(case, dynamic):
    attrs = dict(GEOMETRIES[case])
    model, feeds, _ = integer_model((2, 4, 7, 6), 4, attrs.pop("kernel"), dynamic=dynamic,
                                    **attrs)
    assert_exact(run(lower(model), feeds)[0], run(model, feeds)[0])


@pytest.mark.parametrize("types", list(itertools.product(DTYPES, DTYPES)),
                         ids="x{0[0]}-w{0[1]}".format)
def test_every_int8_type_pair(types):
    model, feeds, _ = integer_model((1, 3, 6, 6), 5, (3, 3), types=types, pads=[1, 2, 1, 0])
    assert_exact(run(lower(model), feeds)[0], run(model, feeds)[0])


@pytest.mark.parametrize("rank", [1, 3])
def test_1d_and_3d(rank, reference_conv):
    kernel, spatial = (3,) * rank, (6, 5, 4)[:rank]
    strides, pads = [2] * rank, [1] * rank + [0] * rank
    model, feeds, values = integer_model((2, 4, *spatial), 3, kernel, strides=strides, pads=pads)
    ref = numpy_conv_integer(values, reference_conv, strides, [1] * rank, pads, 1)
    assert_exact(run(lower(model), feeds)[0], ref)


@pytest.mark.parametrize("group", [1, 2])
def test_per_channel_weight_zero_point(group, reference_conv):
    pads, strides = [1, 0, 1, 2], [1, 2]
    model, feeds, values = integer_model((2, 4, 6, 7), 6, (3, 3), types=("u8", "i8"),
                                         group=group, per_channel=True, pads=pads,
                                         strides=strides)
    ref = numpy_conv_integer(values, reference_conv, strides, [1, 1], pads, group)
    assert_exact(run(lower(model), feeds)[0], ref)


def test_without_zero_points():
    model, feeds, _ = integer_model((1, 3, 5, 5), 2, (3, 3), zero_points=False, pads=[1] * 4)
    rewritten = lower(model)
    assert all(len(n.input) == 2 for n in rewritten.graph.node if n.op_type == "MatMulInteger")
    assert_exact(run(rewritten, feeds)[0], run(model, feeds)[0])


def test_padding_holds_the_input_zero_point():
    model, feeds, _ = integer_model((1, 2, 4, 4), 2, (3, 3), pads=[1, 1, 1, 1])
    (pad,) = [n for n in lower(model).graph.node if n.op_type == "Pad"]
    assert pad.input[2].endswith("x_zero_point")


@pytest.mark.parametrize("group", [1, 2])
def test_run_time_weight_and_zero_points(group):
    model, feeds, _ = integer_model((2, 4, 6, 5), 4, (3, 2), group=group, runtime=True,
                                    pads=[1, 0, 1, 1], strides=[2, 1])
    assert_exact(run(lower(model, "runtime"), feeds)[0], run(model, feeds)[0])


@pytest.mark.parametrize("as_initializers", [False, True], ids=["inputs", "initializers"])
def test_onnx_node_cases(as_initializers):
    cases = node_cases("ConvInteger")
    assert len(cases) == 2
    for case in cases:
        model, feeds = case.with_initializers() if as_initializers else (case.model, case.feeds)
        rewritten = lower(model, "constant" if as_initializers else "runtime")
        assert_exact(run(rewritten, feeds)[0], case.expected)
