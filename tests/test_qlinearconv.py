"""QLinearConv lowered to MatMulInteger, int32 bias and a requantization.

The difference to onnxruntime's QLinearConv is counted in quantized units (steps of the
output's integer type); the target, met by every case here, is 0: onnxruntime rounds
``float(acc) * (x_scale * w_scale / y_scale)`` half to even as well, and the lowered form
computes the same float32 product in the same order. Also: a quantized version of the demo
model (``quantize_static``, QOperator format, so QLinearConv appears) end to end.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from convfamily import feeds_of, node_cases, node_model, op_types, run

from onnx_convfc import rewrite_model

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo_cnn.onnx"
DTYPES = {"u8": np.uint8, "i8": np.int8}
ROLES = ("x_scale", "x_zp", "W", "w_scale", "w_zp", "y_scale", "y_zp")


def qlinear_model(x_shape, m, kernel, *, types=("u8", "i8"), group=1, per_channel=False,
                  bias=True, runtime=False, dynamic=False, scales=None, **attrs):
    """One QLinearConv with seeded random data; ``y_scale`` keeps most outputs in range."""
    rng = np.random.default_rng(zlib.crc32(repr((x_shape, m, kernel, types, group,
                                                 per_channel, attrs)).encode()))
    xt, wt = (DTYPES[t] for t in types)

    def ints(dtype, shape):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)

    x, w = ints(xt, x_shape), ints(wt, (m, x_shape[1] // group, *kernel))
    channels = (m,) if per_channel else ()
    x_scale, w_scale = np.float32(0.02), (rng.uniform(0.002, 0.01, channels)).astype(np.float32)
    depth = w[0].size
    y_scale = np.float32(x_scale * float(np.max(w_scale)) * 75 * 75 * np.sqrt(depth) / 50)
    if scales is not None:
        x_scale, w_scale, y_scale = (np.asarray(s, np.float32) for s in scales)
    zero = 128 if wt == np.uint8 else 0
    values = {
        "X": x, "x_scale": x_scale, "x_zp": np.array(rng.integers(-9, 9) + 128 * (xt == np.uint8),
                                                     xt),
        "W": w, "w_scale": np.asarray(w_scale),
        "w_zp": (rng.integers(-9, 9, channels) + zero).astype(wt) if wt == np.uint8
        else np.zeros(channels, wt),
        "y_scale": y_scale, "y_zp": np.array(rng.integers(-9, 9) + 128 * (xt == np.uint8), xt),
    }
    values["B"] = rng.integers(-40000, 40000, m).astype(np.int32) if bias else None
    inputs = [(name, values[name]) for name in ("X", *ROLES, "B")]
    dims = {"X": ["N", x_shape[1]] + [f"d{i}" for i in range(len(kernel))]} if dynamic else None
    model = node_model("QLinearConv", inputs, consts=() if runtime else (*ROLES, "B"),
                       dims=dims, group=group, **attrs)
    return model, feeds_of(model, inputs)


def lower(model, weights="constant"):
    rewritten, report = rewrite_model(model)
    (row,) = report.rows
    assert (row.op_type, row.lowering, row.weights) == ("QLinearConv", "im2col-requant", weights)
    assert "QLinearConv" not in op_types(rewritten)
    assert {"MatMulInteger", "QuantizeLinear"} <= op_types(rewritten)
    return rewritten


def quantized_units(out: np.ndarray, ref: np.ndarray) -> int:
    """Max difference in steps of the output's integer type."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    return int(np.abs(out.astype(np.int64) - ref.astype(np.int64)).max(initial=0))


def assert_in_range(ref: np.ndarray) -> None:
    """The case is meaningful: most outputs are neither saturated nor constant."""
    info = np.iinfo(ref.dtype)
    assert np.mean((ref > info.min) & (ref < info.max)) > 0.8 and np.unique(ref).size > 20


GEOMETRIES = {
    "3x3 pads": dict(kernel=(3, 3), pads=[1, 1, 1, 1]),
    "asymmetric pads, stride": dict(kernel=(3, 2), pads=[2, 0, 1, 1], strides=[2, 3]),
    "dilated": dict(kernel=(3, 3), dilations=[2, 1], pads=[2, 1, 2, 1]),
    "1x1": dict(kernel=(1, 1)),
    "SAME_UPPER stride 2": dict(kernel=(3, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
    "grouped": dict(kernel=(3, 3), group=2, pads=[1, 1, 1, 1]),
    "depthwise": dict(kernel=(3, 3), group=8, m=8, pads=[1, 1, 1, 1], strides=[2, 1]),
}


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("case", GEOMETRIES)
def test_geometry_matches_onnxruntime(case, per_channel):
    attrs = dict(GEOMETRIES[case])
    model, feeds = qlinear_model((2, 8, 9, 8), attrs.pop("m", 6), attrs.pop("kernel"),
                                 per_channel=per_channel, **attrs)
    ref = run(model, feeds)[0]
    assert_in_range(ref)
    assert quantized_units(run(lower(model), feeds)[0], ref) == 0


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("types", [("u8", "u8"), ("u8", "i8"), ("i8", "i8")],
                         ids="x{0[0]}-w{0[1]}".format)
def test_types_and_bias_match_onnxruntime(types, bias):
    model, feeds = qlinear_model((1, 6, 7, 7), 5, (3, 3), types=types, bias=bias,
                                 pads=[1, 1, 1, 1], dynamic=True)
    ref = run(model, feeds)[0]
    assert_in_range(ref)
    assert quantized_units(run(lower(model), feeds)[0], ref) == 0


def test_ties_round_half_to_even_and_saturation():
    # x_scale * w_scale / y_scale = 0.5: every odd sum is a tie; the tiny y_scale of the
    # second model saturates most outputs.
    model, feeds = qlinear_model((1, 4, 6, 6), 4, (2, 2), bias=False, scales=(1, 1, 2))
    ref = run(model, feeds)[0]
    assert quantized_units(run(lower(model), feeds)[0], ref) == 0
    model, feeds = qlinear_model((1, 4, 6, 6), 4, (2, 2), scales=(0.5, 0.5, 0.01))
    ref = run(model, feeds)[0]
    info = np.iinfo(ref.dtype)
    assert np.mean(np.isin(ref, [info.min, info.max])) > 0.5
    assert quantized_units(run(lower(model), feeds)[0], ref) == 0


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_run_time_operands(per_channel):
    model, feeds = qlinear_model((2, 4, 6, 5), 4, (3, 2), group=2, per_channel=per_channel,
                                 runtime=True, pads=[1, 0, 1, 1])
    ref = run(model, feeds)[0]
    assert quantized_units(run(lower(model, "runtime"), feeds)[0], ref) == 0


@pytest.mark.parametrize("as_initializers", [False, True], ids=["inputs", "initializers"])
def test_onnx_node_case(as_initializers):
    (case,) = node_cases("QLinearConv")
    model, feeds = case.with_initializers() if as_initializers else (case.model, case.feeds)
    rewritten = lower(model, "constant" if as_initializers else "runtime")
    assert quantized_units(run(rewritten, feeds)[0], case.expected) == 0


# ---------------------------------------------------------------- quantized demo model

@pytest.fixture(scope="module")
def quantization():
    return pytest.importorskip("onnxruntime.quantization")


class _Calibration:
    """Four seeded batches for ``quantize_static``."""

    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        rng = np.random.default_rng(0)
        self._batches = iter([{name: rng.standard_normal(shape).astype(np.float32)}
                              for _ in range(4)])

    def get_next(self):
        return next(self._batches, None)


@pytest.mark.skipif(not DEMO.is_file(), reason=f"{DEMO} missing (tools/make_demo_models.py)")
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
def test_quantized_demo_model(quantization, tmp_path, per_channel, weight_type):
    demo = onnx.load(DEMO)
    name = demo.graph.input[0].name
    target = tmp_path / "demo_qoperator.onnx"
    quantization.quantize_static(
        str(DEMO), str(target), _Calibration(name, (1, 3, 32, 32)),
        quant_format=quantization.QuantFormat.QOperator, per_channel=per_channel,
        weight_type=getattr(quantization.QuantType, weight_type),
        activation_type=quantization.QuantType.QUInt8)
    quantized = onnx.load(target)
    convs = [n for n in quantized.graph.node if n.op_type == "QLinearConv"]
    assert len(convs) == sum(n.op_type == "Conv" for n in demo.graph.node)
    rewritten, report = rewrite_model(quantized)
    assert [r.lowering for r in report.rows] == ["im2col-requant"] * len(convs)
    assert "QLinearConv" not in op_types(rewritten)
    onnx.checker.check_model(rewritten)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    # every QLinearConv output, in quantized units, and the model's float output
    probes = [c.output[0] for c in convs]
    for model in (quantized, rewritten):
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(p) for p in probes)
    ref, out = run(quantized, {name: x}), run(rewritten, {name: x})
    for probe, r, o in zip(probes, ref[1:], out[1:]):
        assert quantized_units(o, r) == 0, probe
    np.testing.assert_array_equal(out[0], ref[0])
