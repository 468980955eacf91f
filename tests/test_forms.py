"""Which form ``lowering/patches.py`` and ``lowering/depthwise.py`` emit, and that each one
matches onnxruntime's Conv, at the channel counts the grid (3-6 channels) never reaches.

Forms: Gather of C-rows (static sizes, >= 16 channels per group or a huge kernel),
channels-first Slices (fewer channels), channels-last Slices (dynamic sizes), depthwise
Gather + Mul + ReduceSum in chunks, depthwise shift-add. Each case runs at ORT_ENABLE_ALL and
ORT_DISABLE_ALL, with other batches (an empty one too) or spatial sizes where its dims are
symbolic.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from convfamily import node_model
from convfamily import run as run_node
from convmodels import conv_model, random_conv, session
from onnx import TensorProto, helper, numpy_helper

from onnx_convfc import rewrite_model
from onnx_convfc.conv import conv_spec
from onnx_convfc.lowering.taps import TOO_MANY_TAPS, index_parts

LEVELS = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
TOLERANCE = {np.float32: 1e-4, np.float16: 5e-3}

# op types each form must have, and must not have
FORMS = {
    "gather": ({"Gather", "MatMul"}, {"Slice", "Concat"}),
    "gather_chunks": ({"Gather", "MatMul", "Concat"}, {"Slice"}),
    "channels_first": ({"Slice", "Concat", "MatMul"}, {"Gather"}),
    "slices": ({"Slice", "Concat", "MatMul"}, {"Gather"}),
    "dw_gather": ({"Gather", "Mul", "ReduceSum"}, {"MatMul", "Slice"}),
    "dw_shift_add": ({"Mul"}, {"MatMul", "Gather", "ReduceSum"}),
    "weight_left": ({"MatMul", "Reshape"}, {"Transpose", "Gather", "Slice"}),
    "weight_left_patches": ({"Slice", "MatMul", "Reshape"}, {"Transpose", "Gather"}),
    "fc_pointwise": ({"Transpose", "MatMul"}, {"Gather", "Concat"}),
}


@dataclass(frozen=True)
class Case:
    id: str
    form: str
    c: int
    m: int
    kernel: tuple[int, ...]
    spatial: tuple[int, ...]
    attrs: dict = field(default_factory=dict)
    mode: str = "static"  # static | dyn_batch | dyn_all
    bias: bool = True
    dtype: type = np.float32
    opset: int = 17
    options: dict = field(default_factory=dict)  # rewrite options

    @property
    def group(self) -> int:
        return self.attrs.get("group", 1)


CASES = [
    Case("3x3-c16", "gather", 16, 8, (3, 3), (9, 9), dict(pads=[1, 1, 1, 1])),
    Case("3x3-c16-s2-asym-pads", "gather", 16, 8, (3, 3), (10, 9),
         dict(strides=[2, 2], pads=[0, 1, 2, 1]), bias=False),
    Case("3x3-c16-dil2-dyn-batch", "gather", 16, 8, (3, 3), (9, 8),
         dict(dilations=[2, 2], pads=[2, 1, 1, 2]), mode="dyn_batch"),
    Case("1d-k5-c24-s3", "gather", 24, 5, (5,), (17,), dict(strides=[3], pads=[2, 1])),
    Case("3d-c16", "gather", 16, 4, (3, 2, 3), (5, 4, 5), dict(pads=[1, 0, 1, 1, 1, 0])),
    Case("grouped-cg16", "gather", 32, 8, (3, 3), (7, 7), dict(group=2, pads=[1, 1, 1, 1])),
    Case("grouped-cg16-dyn-batch", "gather", 32, 6, (2, 3), (7, 6),
         dict(group=2, strides=[2, 1]), mode="dyn_batch"),
    Case("3x3-c16-fp16", "gather", 16, 8, (3, 3), (8, 8), dict(pads=[1, 1, 1, 1]),
         dtype=np.float16),
    # over 4 MiB of patches (patches.CHUNK_BYTES): gathered and multiplied per run of rows
    Case("3x3-c32-chunks", "gather_chunks", 32, 8, (3, 3), (64, 64), dict(pads=[1, 1, 1, 1])),
    Case("3x3-c32-s2-dil2-chunks-dyn-batch", "gather_chunks", 32, 8, (3, 3), (150, 60),
         dict(strides=[2, 1], dilations=[2, 2], pads=[2, 0, 1, 2]), mode="dyn_batch",
         bias=False),
    Case("1d-k5-c64-chunks", "gather_chunks", 64, 4, (5,), (4000,), dict(pads=[2, 2])),
    Case("3x3-c32-chunks-fp16", "gather_chunks", 32, 8, (3, 3), (96, 96),
         dict(pads=[1, 1, 1, 1]), dtype=np.float16),
    Case("3x3-c16-dynamic", "slices", 16, 8, (3, 3), (9, 9), dict(pads=[1, 1, 1, 1]),
         mode="dyn_all"),
    Case("stem-3x3-s2", "channels_first", 3, 16, (3, 3), (16, 16),
         dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    Case("stem-7x7-s2-dynamic-same", "channels_first", 3, 8, (7, 7), (15, 13),
         dict(strides=[2, 2], auto_pad="SAME_LOWER"), mode="dyn_all"),
    Case("stem-1d-c8-dil2", "channels_first", 8, 4, (3,), (20,), dict(dilations=[2])),
    Case("grouped-cg4-dynamic", "channels_first", 8, 6, (3, 3), (8, 7),
         dict(group=2, pads=[1, 0, 0, 1]), mode="dyn_all"),
    Case("dw-c32-s2", "dw_gather", 32, 32, (3, 3), (12, 12),
         dict(group=32, strides=[2, 2], pads=[1, 1, 1, 1])),
    Case("dw-c32-5x5-chunks", "dw_gather", 32, 32, (5, 5), (36, 36),
         dict(group=32, pads=[2, 2, 2, 2])),
    # one output row of patches over 2 MiB (depthwise.CHUNK_BYTES): runs of columns
    Case("dw-c200-5x5-wide-rows", "dw_gather", 200, 200, (5, 5), (2, 120),
         dict(group=200, pads=[2, 2, 2, 2])),
    Case("dw-c64-x2-5x5-wide-rows-dyn-batch", "dw_gather", 64, 128, (5, 5), (3, 200),
         dict(group=64, pads=[2, 1, 2, 1]), mode="dyn_batch", bias=False),
    Case("dw-c32-x2-5x5-dyn-batch", "dw_gather", 32, 64, (5, 5), (11, 10),
         dict(group=32, pads=[2, 1, 2, 1]), mode="dyn_batch", bias=False),
    Case("dw-c128-opset11", "dw_gather", 128, 128, (3, 3), (6, 6),
         dict(group=128, pads=[1, 1, 1, 1]), opset=11),
    Case("dw-c32-s2-fp16", "dw_gather", 32, 32, (3, 3), (9, 9),
         dict(group=32, strides=[2, 2]), dtype=np.float16),
    Case("dw-c8", "dw_shift_add", 8, 8, (3, 3), (9, 9), dict(group=8, pads=[1, 1, 1, 1])),
    Case("dw-c32-3x3-s1", "dw_shift_add", 32, 32, (3, 3), (9, 9),
         dict(group=32, pads=[1, 1, 1, 1]), bias=False),
    Case("dw-c8-x3-dynamic", "dw_shift_add", 8, 24, (3, 3), (9, 8),
         dict(group=8, strides=[2, 1], auto_pad="SAME_UPPER"), mode="dyn_all"),
    Case("dw-c8-5x5-fp16", "dw_shift_add", 8, 8, (5, 5), (10, 10),
         dict(group=8, pads=[2, 2, 2, 2]), dtype=np.float16),
    # over 1 MiB of output (depthwise.SHIFT_ADD_CHUNK_BYTES): summed per run of rows
    Case("dw-c16-shift-add-chunks", "dw_shift_add", 16, 16, (3, 3), (200, 96),
         dict(group=16, pads=[1, 1, 1, 1])),
    Case("dw-c8-x2-s2-dil2-shift-add-chunks", "dw_shift_add", 8, 16, (3, 3), (500, 90),
         dict(group=8, strides=[2, 1], dilations=[2, 1], pads=[1, 0, 2, 1]), bias=False,
         mode="dyn_batch"),
    Case("dw-c16-shift-add-chunks-fp16", "dw_shift_add", 16, 16, (5, 5), (300, 130),
         dict(group=16, pads=[2, 2, 2, 2]), dtype=np.float16),
    Case("dw-c4-1x1-no-bias", "dw_shift_add", 4, 4, (1, 1), (5, 5), dict(group=4), bias=False),
    Case("dw-c128-dynamic", "dw_shift_add", 128, 128, (3, 3), (6, 6),
         dict(group=128, strides=[2, 2]), mode="dyn_all"),
    # --weight-left: W @ X over channels-first pixels or patches
    Case("1x1-weight-left", "weight_left", 16, 24, (1, 1), (28, 30),
         options=dict(weight_left=True)),
    Case("1x1-weight-left-dyn-batch-fp16", "weight_left", 8, 4, (1, 1), (30, 30),
         mode="dyn_batch", bias=False, dtype=np.float16, options=dict(weight_left=True)),
    Case("1d-weight-left-valid", "weight_left", 4, 6, (1,), (800,), dict(auto_pad="VALID"),
         options=dict(weight_left=True)),
    Case("1x1-weight-left-few-channels", "weight_left", 16, 8, (1, 1), (7, 5),
         mode="dyn_batch", options=dict(weight_left=True)),
    Case("1x1-weight-left-wide-and-small", "fc_pointwise", 260, 8, (1, 1), (27, 28),
         options=dict(weight_left=True)),
    Case("im2col-weight-left-channels-first", "weight_left_patches", 3, 8, (3, 3), (17, 19),
         dict(strides=[2, 1], pads=[1, 0, 1, 2]), mode="dyn_batch",
         options=dict(weight_left=True)),
    Case("im2col-weight-left-1d-same", "weight_left_patches", 5, 4, (5,), (40,),
         dict(auto_pad="SAME_UPPER", strides=[3]), bias=False, dtype=np.float16,
         options=dict(weight_left=True)),
    Case("im2col-weight-left-dynamic-sizes", "channels_first", 3, 8, (3, 3), (17, 19),
         mode="dyn_all", options=dict(weight_left=True)),
    Case("1x1-weight-left-strided", "fc_pointwise", 16, 8, (1, 1), (60, 60), dict(strides=[2, 2]),
         options=dict(weight_left=True)),
    Case("1x1-weight-left-dynamic", "fc_pointwise", 16, 8, (1, 1), (30, 30), mode="dyn_all",
         options=dict(weight_left=True)),
    # over taps.MAX_SLICE_TAPS taps: a Gather whatever the channels, never 4225 Slices
    Case("huge-kernel-c2", "gather", 2, 3, (65, 65), (66, 67), dict(pads=[0, 1, 0, 0])),
    Case("huge-kernel-dw-c4", "dw_gather", 4, 4, (65, 65), (66, 66), dict(group=4)),
]


def _model(case: Case) -> onnx.ModelProto:
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    w, b = random_conv(rng, case.c, case.m, case.kernel, case.group, case.bias, case.dtype)
    spatial = list(case.spatial)
    dims = {"static": None, "dyn_batch": ["N", case.c, *spatial],
            "dyn_all": ["N", case.c, *[f"d{i}" for i in range(len(spatial))]]}[case.mode]
    return conv_model((2, case.c, *spatial), w, b, dims=dims, opset=case.opset, **case.attrs)


def _inputs(case: Case) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    shapes = [(2, case.c, *case.spatial)]
    # onnxruntime's Reshape fusion turns a run-time group shape into one with -1, which an
    # empty batch cannot resolve (see test_lowering_grid.test_empty_batch_...): not ours
    if case.mode == "dyn_batch" or (case.mode == "dyn_all" and case.group == 1):
        shapes.append((0, case.c, *case.spatial))
    if case.mode == "dyn_all":
        shapes.append((1, case.c, *[s + 3 for s in case.spatial]))
    return [rng.standard_normal(s).astype(case.dtype) for s in shapes]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_form_matches_onnxruntime_conv(case, close, faithful):
    model = _model(case)
    rewritten, report = rewrite_model(model, **case.options)
    faithful(model, rewritten, report)
    ops = {n.op_type for n in rewritten.graph.node}
    wanted, unwanted = FORMS[case.form]
    assert wanted <= ops and not unwanted & ops, sorted(ops)
    first_rows = any(n.name.endswith("/patches_to_rows") for n in rewritten.graph.node)
    assert first_rows == (case.form == "channels_first")
    reference = session(model, LEVELS[1])
    for level in LEVELS:
        sess = session(rewritten, level)
        for x in _inputs(case):
            ref = reference.run(None, {"X": x})[0]
            close(sess.run(None, {"X": x})[0], ref, TOLERANCE[case.dtype],
                  f"{case.id} at {level}, input {list(x.shape)}")


@pytest.mark.parametrize("op, group, method", [
    ("Conv", 1, "auto"), ("Conv", 1, "im2col"), ("Conv", 2, "auto"), ("Conv", 2, "depthwise"),
    ("ConvTranspose", 1, "auto"), ("ConvInteger", 1, "auto"),
])
def test_huge_kernel_with_dynamic_sizes_is_refused_not_sliced(op, group, method):
    """65x65 = 4225 taps over a run-time size would be one Slice per tap: refused, with the
    stable reason, before anything is built."""
    dtype = np.uint8 if op == "ConvInteger" else np.float32
    shape = (2, 1, 65, 65) if op == "ConvTranspose" else (2, 2 // group, 65, 65)
    inputs = [("X", np.zeros((1, 2, 70, 70), dtype)), ("W", np.ones(shape, dtype))]
    model = node_model(op, inputs, consts=("W",), dims={"X": ["N", 2, "H", "W"]}, group=group)
    rewritten, report = rewrite_model(model, method=method)
    (row,) = report.rows
    prefix = "" if method == "auto" else f"{method} does not apply: "
    assert (row.lowering, row.reason) == (None, prefix + TOO_MANY_TAPS)
    assert [n.op_type for n in rewritten.graph.node] == [op]


def test_gather_index_parts_are_int32_and_shared_by_convs_of_one_geometry(close):
    """Two 3x3 convs of the same geometry, different weights: one set of index parts, of
    8 + 8 + 9 numbers (not 64 x 9), summed by Adds that onnxruntime folds."""
    rng = np.random.default_rng(0)
    w1, b1 = random_conv(rng, 16, 16, (3, 3))
    w2, b2 = random_conv(rng, 16, 16, (3, 3))
    nodes = [helper.make_node("Conv", ["X", "W1", "B1"], ["H"], name="c1", pads=[1] * 4),
             helper.make_node("Conv", ["H", "W2", "B2"], ["Y"], name="c2", pads=[1] * 4)]
    inits = [numpy_helper.from_array(a, n) for n, a in
             (("W1", w1), ("B1", b1), ("W2", w2), ("B2", b2))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "X", onnx.TensorProto.FLOAT, [1, 16, 8, 8])], [helper.make_tensor_value_info(
            "Y", onnx.TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rewritten, _ = rewrite_model(model)
    inits = {t.name: t for t in rewritten.graph.initializer}
    parts = {c: sorted(i for n in rewritten.graph.node if n.name.startswith(f"{c}/")
                       and n.op_type == "Add" and "patch_index" in n.name
                       for i in n.input if i in inits) for c in ("c1", "c2")}
    assert parts["c1"] == parts["c2"] and len(parts["c1"]) == 3
    assert {inits[p].data_type for p in parts["c1"]} == {onnx.TensorProto.INT32}
    assert sum(int(np.prod(inits[p].dims)) for p in parts["c1"]) == 8 + 8 + 9
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    close(session(rewritten, LEVELS[0]).run(None, {"X": x})[0],
          session(model, LEVELS[0]).run(None, {"X": x})[0], 1e-4)


def test_index_parts_add_up_to_positions_in_the_padded_input():
    """3x3, stride 2 over a 5x6 padded input: row 0 of output, then the taps."""
    model = conv_model((1, 16, 3, 4), np.ones((1, 16, 3, 3), np.float32), strides=[2, 2],
                       pads=[1, 1, 1, 1])
    spec = conv_spec(model.graph.node[0], (1, 16, 3, 3), (1, 16, 3, 4))
    parts = index_parts(spec)
    assert [p.shape for p in parts] == [(2, 1, 1), (1, 2, 1), (1, 1, 9)]
    index = functools.reduce(np.add, parts)
    assert index.dtype == np.int32
    np.testing.assert_array_equal(index[0, 0], [0, 1, 2, 6, 7, 8, 12, 13, 14])
    np.testing.assert_array_equal(index[1, 1], index[0, 0] + 2 * 6 + 2)


def test_depthwise_gather_works_in_chunks():
    """5x5 over 36x36 with 32 channels: 112.5 KiB of patches per output row, so two chunks of
    18 rows."""
    (case,) = [c for c in CASES if c.id == "dw-c32-5x5-chunks"]
    rewritten, _ = rewrite_model(_model(case))
    gathers = [n for n in rewritten.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 2
    assert [n.op_type for n in rewritten.graph.node].count("Concat") == 1


def test_depthwise_shift_add_sums_per_run_of_rows():
    """16 channels @200x96: 6 KiB of output per row, so runs of 170 and 30 rows, each a Slice
    of the padded input's rows and nine taps."""
    (case,) = [c for c in CASES if c.id == "dw-c16-shift-add-chunks"]
    model = _model(case)
    rewritten, report = rewrite_model(model)
    names = [n.name for n in rewritten.graph.node]
    assert sum("/rows_" in n for n in names) == 2
    assert sum("/tap_" in n for n in names) == 2 * 9
    inits = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    ends = sorted(int(inits[n.input[2]][0]) for n in rewritten.graph.node if "/rows_" in n.name)
    assert ends == [170 + 2, 200 + 2]
    # both runs read the same nine scale constants, counted once in the report
    added = sum(a.nbytes for name, a in inits.items()
                if name not in {t.name for t in model.graph.initializer})
    assert report.rows[0].weight_bytes_after == added


def test_im2col_gathers_and_multiplies_per_chunk_of_rows():
    """64x64 outputs of 288 patch values: 72 KiB per output row, so two chunks of 56 and 8
    rows, each a Gather, a MatMul and its bias Add, concatenated once."""
    (case,) = [c for c in CASES if c.id == "3x3-c32-chunks"]
    rewritten, _ = rewrite_model(_model(case))
    ops = [n.op_type for n in rewritten.graph.node]
    assert (ops.count("Gather"), ops.count("MatMul"), ops.count("Concat")) == (2, 2, 1)
    assert ops.count("Add") == 1 + 2 * 2  # index parts: one shared sum, then per chunk one
    # more for the index and one for the bias
    inits = {t.name: t for t in rewritten.graph.initializer}
    rows = sorted(int(numpy_helper.to_array(inits[n.input[1]])[1])
                  for n in rewritten.graph.node if "/patch_rows_" in n.name)
    assert rows == [8, 56]


def test_depthwise_gather_splits_wide_rows_into_runs_of_columns():
    """2x120 outputs of 25 taps x 200 channels: 2.4 MB of patches a row, so each row is
    gathered in runs of 104 and 16 columns, concatenated per row, then the rows."""
    (case,) = [c for c in CASES if c.id == "dw-c200-5x5-wide-rows"]
    rewritten, _ = rewrite_model(_model(case))
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("Gather") == 4 and ops.count("Concat") == 3
    inits = {t.name: t for t in rewritten.graph.initializer}
    widths = sorted(int(inits[i].dims[1]) for n in rewritten.graph.node if n.op_type == "Add"
                    for i in n.input if i in inits and len(inits[i].dims) == 3
                    and inits[i].dims[1] > 1)
    assert widths == [16, 16, 104, 104]


def test_depthwise_keeps_per_group_matmuls_with_split_groups():
    """Quantizers need 2-D MatMul weights: --split-groups keeps the GEMM form."""
    (case,) = [c for c in CASES if c.id == "dw-c32-s2"]
    rewritten, _ = rewrite_model(_model(case), split_groups=True)
    matmuls = [n for n in rewritten.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 32
    inits = {t.name: t for t in rewritten.graph.initializer}
    assert {tuple(inits[n.input[1]].dims) for n in matmuls} == {(9, 1)}


def test_conv_integer_gathers_rows_padded_with_the_zero_point():
    """The integer lowering shares the Gather rows; padding holds the input zero point."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 255, (2, 16, 7, 7), endpoint=True).astype(np.uint8)
    w = rng.integers(0, 255, (8, 16, 3, 3), endpoint=True).astype(np.uint8)
    inputs = [("X", x), ("W", w), ("x_zp", np.array(131, np.uint8)),
              ("w_zp", np.array(120, np.uint8))]
    model = node_model("ConvInteger", inputs, consts=("W", "x_zp", "w_zp"), pads=[1, 1, 1, 1])
    rewritten, _ = rewrite_model(model)
    ops = {n.op_type for n in rewritten.graph.node}
    assert {"Gather", "MatMulInteger"} <= ops and "ConvInteger" not in ops
    np.testing.assert_array_equal(run_node(rewritten, {"X": x})[0], run_node(model, {"X": x})[0])


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


@pytest.mark.parametrize(("pinned", "opset"), [(False, 17), (True, 17), (True, 11)])
def test_bias_add_fuses_into_gemm_with_a_symbolic_batch(pinned, opset, tmp_path, close):
    """A 2-D MatMul + Add, which onnxruntime fuses into Gemm; with sizes static only through
    --input-shape the form still serves other sizes and an empty batch (the result's shape
    is read at run time, also before Reshape had allowzero: PP-OCR's opsets 11 and 12)."""
    rng = np.random.default_rng(5)
    w, b = random_conv(rng, 16, 8, (1, 1), 1, True, np.float32)
    dims = ["N", 16, "H", "W"] if pinned else ["N", 16, 64, 64]
    model = conv_model((1, 16, 64, 64), w, b, dims=dims, opset=opset)
    shapes = [("X", (1, 16, 64, 64))] if pinned else []
    rewritten, _ = rewrite_model(model, input_shapes=shapes)
    assert ("Shape" in {n.op_type for n in rewritten.graph.node}) == pinned
    ops = _optimized_ops(rewritten, tmp_path)
    assert "Gemm" in ops and "Add" not in ops and "MatMul" not in ops, ops
    sizes = [(1, 16, 64, 64), (0, 16, 64, 64)] + ([(2, 16, 30, 20)] if pinned else [])
    for shape in sizes:
        x = rng.standard_normal(shape).astype(np.float32)
        close(session(rewritten).run(None, {"X": x})[0], session(model).run(None, {"X": x})[0],
              1e-4, f"input {shape}")


def test_transposes_cancel_across_a_broadcast_mul_between_pinned_gemms(tmp_path, close):
    """With sizes pinned by --input-shape the GEMM's result is reshaped at run time; its rank
    is declared, or onnxruntime cannot move the Transposes across ``x * scale`` and keeps one
    per tap of the next conv (PP-OCRv4 det)."""
    rng = np.random.default_rng(11)
    w1, b1 = random_conv(rng, 64, 64, (1, 1), 1, True, np.float32)
    w2, b2 = random_conv(rng, 64, 64, (3, 3), 64, True, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W1", "B1"], ["a"], name="pointwise"),
         helper.make_node("Mul", ["scale", "a"], ["b"]),
         helper.make_node("Conv", ["b", "W2", "B2"], ["Y"], name="depthwise", group=64,
                          pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 64, "H", "W"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 64, "H", "W"])],
        [numpy_helper.from_array(v, k) for k, v in
         dict(W1=w1, B1=b1, W2=w2, B2=b2, scale=np.array([0.5], np.float32)).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    rewritten, _ = rewrite_model(model, input_shapes=[("X", (1, 64, 40, 40))])
    onnx.checker.check_model(rewritten, full_check=True)
    ops = _optimized_ops(rewritten, tmp_path)
    assert "Gemm" in ops and ops.count("Transpose") == 2, ops
    for shape in [(1, 64, 40, 40), (2, 64, 40, 40), (0, 64, 40, 40)]:
        x = rng.standard_normal(shape).astype(np.float32)
        close(session(rewritten).run(None, {"X": x})[0], session(model).run(None, {"X": x})[0],
              1e-4, f"input {shape}")
