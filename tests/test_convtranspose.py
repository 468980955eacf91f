"""ConvTranspose lowered to MatMul form, against onnxruntime's own ConvTranspose kernel.

``subpixel`` (the default: one ordinary conv over the input, lowered to MatMul, then a
depth-to-space) over a geometry grid of strides, dilations, pads, output_padding,
output_shape, auto_pad and groups in 1-D, 2-D and 3-D, static and dynamic; ``dense`` on the
static cases; the ConvTranspose cases bundled with onnx; PP-OCRv4 det end to end (zoo).
"""

from __future__ import annotations

import itertools
import os
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from convfamily import feeds_of, node_cases, node_model, op_types, run
from onnx import numpy_helper

from onnx_convfc import rewrite_model
from onnx_convfc.convtranspose import conv_transpose_spec
from onnx_convfc.lowering.convtranspose import _axes, tap_table

PYTORCH_CASES = Path(onnx.__file__).parent / "backend" / "test" / "data" / "pytorch-converted"
ZOO = Path(os.environ.get("ONNX_CONVFC_ZOO", Path.home() / ".cache" / "onnx-convfc" / "zoo"))
PPOCR_DET = ZOO / "rapidocr_onnxruntime-1.4.4" / "rapidocr_onnxruntime" / "models" \
    / "ch_PP-OCRv4_det_infer.onnx"
REL = 1e-4  # float32: max error relative to the output scale


def transpose_model(x_shape, c, mg, kernel, *, group=1, bias=True, dynamic=False,
                    runtime=False, **attrs):
    """One ConvTranspose with seeded random data; returns the model and its feeds."""
    rng = np.random.default_rng(zlib.crc32(repr((x_shape, c, mg, kernel, group, attrs))
                                           .encode()))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((c, mg, *kernel)).astype(np.float32)
    b = rng.standard_normal(mg * group).astype(np.float32) if bias else None
    inputs = [("X", x), ("W", w), ("B", b)]
    dims = {"X": ["N", c] + [f"d{i}" for i in range(len(kernel))]} if dynamic else None
    model = node_model("ConvTranspose", inputs, consts=() if runtime else ("W", "B"),
                       dims=dims, group=group, **attrs)
    return model, feeds_of(model, inputs)


def max_error(model, rewritten, feeds) -> float:
    """Max abs difference relative to max(1, output scale); shapes must agree."""
    ref, out = run(model, feeds)[0], run(rewritten, feeds)[0]
    assert out.shape == ref.shape, f"shape {out.shape} != onnxruntime's {ref.shape}"
    return float(np.abs(out - ref).max(initial=0)) / max(1.0, float(np.abs(ref).max()))


def lowered(model, lowering="subpixel", **options):
    rewritten, report = rewrite_model(model, **options)
    (row,) = report.rows
    assert row.op_type == "ConvTranspose"
    assert row.lowering == lowering, row.reason
    assert not op_types(rewritten) & {"ConvTranspose", "Col2Im"}
    onnx.checker.check_model(rewritten, full_check=True)
    return rewritten, row


# ---------------------------------------------------------------- geometry grid, subpixel

@pytest.mark.parametrize("kernel,stride,dilation",
                         list(itertools.product((1, 2, 3, 4), (1, 2, 3), (1, 2))))
def test_1d_grid(kernel, stride, dilation):
    failures = []
    for pads, output_padding, group, dynamic in itertools.product(
            ((0, 0), (2, 1)), (0, 1), (1, 2), (False, True)):
        if output_padding >= stride:
            continue
        model, feeds = transpose_model((2, 4, 5), 4, 3, (kernel,), group=group, dynamic=dynamic,
                                       strides=[stride], dilations=[dilation], pads=list(pads),
                                       output_padding=[output_padding])
        rewritten, _ = lowered(model)
        err = max_error(model, rewritten, feeds)
        if err > REL:
            failures.append((pads, output_padding, group, dynamic, err))
    assert not failures


CASES_2D = {
    "k2 s2 (PP-OCR upsampling)": dict(kernel=(2, 2), strides=[2, 2]),
    "k4 s2 p1 (GAN upsampling)": dict(kernel=(4, 4), strides=[2, 2], pads=[1, 1, 1, 1]),
    "k3 s2 p1 op1": dict(kernel=(3, 3), strides=[2, 2], pads=[1, 1, 1, 1],
                         output_padding=[1, 1]),
    "asymmetric": dict(kernel=(3, 2), strides=[3, 2], pads=[1, 2, 0, 1], output_padding=[2, 0]),
    "dilated": dict(kernel=(3, 3), strides=[2, 1], dilations=[2, 3], pads=[2, 1, 0, 3]),
    "stride 1 (a flipped conv)": dict(kernel=(3, 3), pads=[1, 1, 1, 1]),
    "grouped": dict(kernel=(3, 3), strides=[2, 2], group=2, pads=[1, 0, 1, 0]),
    "depthwise": dict(kernel=(4, 4), strides=[2, 2], group=4, mg=1, pads=[1, 1, 1, 1]),
    "pads beyond the kernel": dict(kernel=(3, 3), strides=[2, 2], pads=[7, 6, 5, 8]),
    "kernel smaller than stride": dict(kernel=(2, 1), strides=[3, 4], output_padding=[2, 3]),
    "no bias": dict(kernel=(3, 3), strides=[2, 2], bias=False),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", CASES_2D)
def test_2d_cases(case, dynamic):
    attrs = dict(CASES_2D[case])
    kernel, mg = attrs.pop("kernel"), attrs.pop("mg", 3)
    model, feeds = transpose_model((2, 4, 9, 7), 4, mg, kernel, dynamic=dynamic, **attrs)
    rewritten, _ = lowered(model)
    assert max_error(model, rewritten, feeds) <= REL


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_3d(dynamic):
    model, feeds = transpose_model((1, 4, 3, 4, 5), 4, 2, (3, 2, 3), group=2, dynamic=dynamic,
                                   strides=[2, 1, 3], dilations=[1, 2, 1],
                                   pads=[1, 0, 1, 0, 1, 2], output_padding=[1, 0, 2])
    rewritten, _ = lowered(model)
    assert max_error(model, rewritten, feeds) <= REL


def test_dynamic_model_serves_other_sizes():
    model, _ = transpose_model((1, 4, 5, 5), 4, 3, (3, 3), dynamic=True, strides=[2, 2],
                               pads=[1, 1, 1, 1], output_padding=[1, 0])
    rewritten, _ = lowered(model)
    rng = np.random.default_rng(7)
    for shape in [(3, 4, 1, 1), (1, 4, 2, 9), (2, 4, 8, 3)]:
        feeds = {"X": rng.standard_normal(shape).astype(np.float32)}
        assert max_error(model, rewritten, feeds) <= REL, shape


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("kernel,stride", [(3, 2), (4, 2), (2, 3), (1, 2), (5, 3)])
def test_auto_pad(auto_pad, kernel, stride, dynamic):
    model, feeds = transpose_model((1, 2, 5, 4), 2, 3, (kernel, kernel), dynamic=dynamic,
                                   strides=[stride, stride], auto_pad=auto_pad)
    rewritten, _ = lowered(model)
    assert max_error(model, rewritten, feeds) <= REL


OUTPUT_SHAPES = {
    "natural size": dict(output_shape=[9, 7]),
    "odd totals": dict(output_shape=[8, 6]),
    "odd totals, SAME_UPPER": dict(output_shape=[8, 6], auto_pad="SAME_UPPER"),
    "larger than natural": dict(output_shape=[11, 8]),
    "with output_padding": dict(output_shape=[10, 8], output_padding=[1, 1]),
}


@pytest.mark.parametrize("case", OUTPUT_SHAPES)
@pytest.mark.parametrize("lowering", ["subpixel", "dense"])
def test_output_shape(case, lowering):
    model, feeds = transpose_model((1, 2, 3, 3), 2, 3, (3, 3), strides=[3, 2],
                                   **OUTPUT_SHAPES[case])
    rewritten, _ = lowered(model, lowering, method="auto" if lowering == "subpixel" else lowering)
    assert max_error(model, rewritten, feeds) <= REL


# ---------------------------------------------------------------- refusals

def _skip_reason(model, **options) -> str:
    rewritten, report = rewrite_model(model, **options)
    (row,) = report.rows
    assert row.lowering is None and op_types(rewritten) == {"ConvTranspose"}
    return row.reason


def test_output_shape_with_dynamic_input_is_skipped():
    model, _ = transpose_model((1, 2, 3, 3), 2, 3, (3, 3), dynamic=True, strides=[3, 2],
                               output_shape=[10, 8])
    assert _skip_reason(model) == ("output_shape is set but an input size is only known at "
                                   "run time")


def test_inconsistent_output_shape_is_skipped():
    model, _ = transpose_model((1, 2, 3, 3), 2, 3, (3, 3), strides=[3, 2], output_shape=[12, 8])
    assert _skip_reason(model).startswith("invalid conv: output_shape=[12, 8] is inconsistent")


def test_output_shape_with_batch_and_channels_is_skipped():
    model, _ = transpose_model((1, 2, 3, 3), 2, 3, (3, 3), strides=[3, 2],
                               output_shape=[1, 3, 9, 7])
    assert _skip_reason(model) == ("invalid conv: output_shape=[1, 3, 9, 7] invalid for a 2-D "
                                   "ConvTranspose")


def test_output_padding_not_below_stride_is_skipped():
    model, _ = transpose_model((1, 2, 3), 2, 3, (3,), strides=[2], dilations=[3],
                               output_padding=[2])
    assert _skip_reason(model) == "invalid conv: output_padding=[2] must be less than strides=[2]"


def test_output_entirely_in_padding_is_skipped():
    model, _ = transpose_model((1, 1, 1), 1, 1, (2,), strides=[2], pads=[2, 0],
                               output_padding=[1])
    assert _skip_reason(model) == "the output lies entirely in the padding"
    # sizes known at run time: an input of 1 would give the phase conv no rows while the
    # output has one position (found by tools/fuzz.py), so the lowering is refused
    dynamic, _ = transpose_model((1, 1, 1), 1, 1, (2,), strides=[2], pads=[2, 0],
                                 output_padding=[1], dynamic=True)
    assert "entirely in the padding" in _skip_reason(dynamic)
    # without output_padding such an input has no output for onnxruntime either
    no_output, _ = transpose_model((1, 1, 3), 1, 1, (2,), strides=[2], pads=[2, 0],
                                   dynamic=True)
    lowered(no_output)


def test_only_and_skip_name_the_lowering_and_the_node():
    model, _ = transpose_model((1, 4, 5, 5), 4, 3, (2, 2), strides=[2, 2])
    assert _skip_reason(model, skip=("subpixel",)) == "excluded by --skip subpixel"
    assert _skip_reason(model, only=("im2col",)) == "not selected by --only"
    assert _skip_reason(model, skip=("no*",)) == "excluded by --skip"
    lowered(model, only=("subpixel",))
    lowered(model, only=("node",))


# ---------------------------------------------------------------- dense

@pytest.mark.parametrize("case", ["k3 s2 p1 op1", "asymmetric", "dilated", "depthwise",
                                  "pads beyond the kernel", "kernel smaller than stride"])
def test_dense(case):
    attrs = dict(CASES_2D[case])
    kernel, mg = attrs.pop("kernel"), attrs.pop("mg", 3)
    model, feeds = transpose_model((2, 4, 9, 7), 4, mg, kernel, **attrs)
    rewritten, _ = lowered(model, "dense", method="dense")
    assert max_error(model, rewritten, feeds) <= REL
    (matmul,) = [n for n in rewritten.graph.node if n.op_type == "MatMul"]
    weight = next(t for t in rewritten.graph.initializer if t.name == matmul.input[1])
    per_sample = run(model, feeds)[0][0].size
    assert list(weight.dims) == [4 * 9 * 7, per_sample]  # the exact FC layer


def test_dense_runs_an_empty_batch():
    """The flatten is ``[-1, K]``: ``[0, -1]`` cannot be resolved for a batch of 0, and
    onnxruntime refused to load the rewritten model when the batch was declared 0."""
    model, _ = transpose_model((0, 4, 5, 5), 4, 3, (3, 3), strides=[2, 2])
    rewritten, _ = lowered(model, "dense", method="dense")
    x = np.zeros((0, 4, 5, 5), np.float32)
    assert run(rewritten, {"X": x})[0].shape == run(model, {"X": x})[0].shape == (0, 3, 11, 11)


def test_dense_falls_back_over_budget_and_when_dynamic():
    model, feeds = transpose_model((1, 4, 9, 7), 4, 3, (3, 3), strides=[2, 2])
    rewritten, row = lowered(model, "subpixel", method="dense", max_dense_bytes=1000)
    assert row.note.startswith("dense does not apply: matrix [252, 855] needs")
    assert max_error(model, rewritten, feeds) <= REL
    model, _ = transpose_model((1, 4, 9, 7), 4, 3, (3, 3), strides=[2, 2], dynamic=True)
    _, row = lowered(model, "subpixel", method="dense")
    assert row.note == "dense does not apply: spatial size is not static; fell back to subpixel"


# ---------------------------------------------------------------- structure

def test_kernel_equal_to_stride_is_one_matmul_and_a_depth_to_space():
    model, _ = transpose_model((1, 24, 8, 8), 24, 24, (2, 2), strides=[2, 2])
    rewritten, row = lowered(model)
    assert [n.op_type for n in rewritten.graph.node] == [
        "Transpose", "MatMul", "Add", "Reshape", "Transpose", "Reshape", "Transpose"]
    (matmul,) = [n for n in rewritten.graph.node if n.op_type == "MatMul"]
    weight = next(t for t in rewritten.graph.initializer if t.name == matmul.input[1])
    assert list(weight.dims) == [24, 24 * 4]  # FC form: B = [C, M * phases], precomputed
    assert row.weights == "constant" and row.geometry == "24->24 k2x2 s2x2"


def test_tap_table_places_every_tap_once():
    node = onnx.helper.make_node("ConvTranspose", ["X", "W"], ["Y"], strides=[2, 3],
                                 dilations=[3, 1])
    spec = conv_transpose_spec(node, (2, 2, 3, 4), (1, 2, 5, 5))
    table = tap_table(spec, _axes(spec))
    taps = 3 * 4
    assert table.shape == (2 * 3, 4 * 2)  # phases, phase-kernel offsets: shift (6//2, 3//3)+1
    assert sorted(table[table < taps]) == list(range(taps))


# ---------------------------------------------------------------- onnx's own cases

@pytest.mark.parametrize("case", ["test_ConvTranspose2d", "test_ConvTranspose2d_no_bias"])
def test_pytorch_converted_cases(case):
    folder = PYTORCH_CASES / case
    model = onnx.load(folder / "model.onnx")
    data = folder / "test_data_set_0"
    x = numpy_helper.to_array(onnx.load_tensor(data / "input_0.pb"))
    expected = numpy_helper.to_array(onnx.load_tensor(data / "output_0.pb"))
    rewritten, report = rewrite_model(model)
    assert [r.lowering for r in report.rows] == ["subpixel"]
    out = run(rewritten, {model.graph.input[0].name: x})[0]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_onnx_node_cases_with_weights_as_initializers():
    cases = node_cases("ConvTranspose")
    assert len(cases) >= 10
    for case in cases:
        model, feeds = case.with_initializers()
        rewritten, report = rewrite_model(model)
        assert [(r.lowering, r.weights) for r in report.rows] == [("subpixel", "constant")]
        np.testing.assert_allclose(run(rewritten, feeds)[0], case.expected, rtol=1e-5,
                                   atol=1e-5, err_msg=case.name)


# ---------------------------------------------------------------- PP-OCRv4 det

@pytest.mark.zoo
@pytest.mark.skipif(not PPOCR_DET.is_file(),
                    reason=f"{PPOCR_DET} not fetched (python tools/fetch_zoo.py)")
def test_ppocr_det_convtranspose_end_to_end():
    model = onnx.load(PPOCR_DET)
    upsampled = [n.output[0] for n in model.graph.node if n.op_type == "ConvTranspose"]
    assert len(upsampled) == 2
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in upsampled)
    rewritten, report = rewrite_model(model)
    assert [r.lowering for r in report.rows if r.op_type == "ConvTranspose"] == ["subpixel"] * 2
    assert all(r.lowering for r in report.rows), [r.reason for r in report.rows if r.reason]
    assert not op_types(rewritten) & {"Conv", "ConvTranspose"}
    x = np.random.default_rng(0).standard_normal((1, 3, 320, 480)).astype(np.float32)
    for ref, out in zip(run(model, {"x": x}), run(rewritten, {"x": x})):
        assert np.abs(out - ref).max() <= REL * max(1.0, float(np.abs(ref).max()))
