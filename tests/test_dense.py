"""``--method dense``: the exact fully connected form of a conv, against onnxruntime's Conv.

The grid crosses rank (1-D/2-D/3-D), every ``auto_pad``, group kinds (plain, grouped,
depthwise, depthwise with a channel multiplier), strides and dilations, with and without
bias, fp32 and fp16, static and symbolic batch. Then: the fallback when dense cannot apply
(symbolic spatial dims, matrix over ``--max-dense-bytes``), ``--strict`` making that an error,
and the Model Zoo MNIST CNN (skipped when the zoo cache is absent).
"""

from __future__ import annotations

import io
import itertools
import os
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from convmodels import conv_model, random_conv, run
from onnx import numpy_helper
from rich.console import Console

from onnx_convfc import rewrite_model
from onnx_convfc.cli import main
from onnx_convfc.conv import conv_spec
from onnx_convfc.lowering.weights import dense_matrix
from onnx_convfc.options import parse_bytes
from onnx_convfc.plan import PlanError

DENSE_OPS = {"Reshape", "MatMul", "Add"}
TOLERANCE = {np.float32: 1e-5, np.float16: 5e-3}  # of max(1, max|reference|)
SPATIAL = (7, 6, 5)  # truncated to the rank; the matrix grows with its square
GROUPS = {"g1": (4, 6, 1), "grouped": (6, 9, 3), "depthwise": (4, 4, 4), "dwx2": (3, 6, 3)}
STEPS = [((1, 1, 1), (1, 1, 1)), ((2, 1, 3), (1, 1, 1)), ((1, 1, 1), (2, 1, 2)),
         ((2, 3, 1), (3, 2, 1))]  # strides, dilations (truncated to the rank)
PADS = (1, 0, 2, 0, 2, 1)  # explicit begins + ends (asymmetric), for NOTSET
AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")
GRID = [(rank, pad, groups, i) for i, (rank, pad, groups)
        in enumerate(itertools.product((1, 2, 3), AUTO_PADS, GROUPS))]


def _grid_id(case) -> str:
    rank, pad, groups, i = case
    return f"{rank}d-{pad}-{groups}-steps{i % 4}"


def _grid_model(case, batch_dim):
    rank, pad, groups, i = case
    c, m, group = GROUPS[groups]
    strides, dilations = (list(v[:rank]) for v in STEPS[i % 4])
    dtype = np.float16 if i % 5 == 0 else np.float32
    rng = np.random.default_rng(zlib.crc32(_grid_id(case).encode()))
    w, b = random_conv(rng, c, m, (3, 2, 3)[:rank], group, bias=i % 2 == 0, dtype=dtype)
    attrs = dict(strides=strides, dilations=dilations, group=group)
    if pad == "NOTSET":
        attrs["pads"] = list(PADS[:rank] + PADS[3:3 + rank])
    else:
        attrs["auto_pad"] = pad
    shape = (2, c, *SPATIAL[:rank])
    model = conv_model(shape, w, b, dims=[batch_dim, *shape[1:]], **attrs)
    return model, shape[1:], w, b, attrs, rng


def _reference(model, x, w, b, attrs, explicit_pads, reference_conv):
    """onnxruntime's Conv, or the numpy one where onnxruntime refuses SAME_* with dilation."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad.startswith("SAME") and any(d > 1 for d in attrs["dilations"]):
        pads = explicit_pads(x.shape[2:], w.shape[2:], attrs["strides"], attrs["dilations"],
                             None, auto_pad)
        return reference_conv(x, w, b, attrs["strides"], attrs["dilations"], pads,
                              attrs["group"]).astype(x.dtype)
    return run(model, {"X": x})[0]


@pytest.mark.parametrize("batch_dim", [2, "N"], ids=["static", "dyn_batch"])
@pytest.mark.parametrize("case", GRID, ids=[_grid_id(c) for c in GRID])
def test_dense_matches_onnxruntime_conv(case, batch_dim, explicit_pads, reference_conv, close,
                                        faithful):
    model, sample_shape, w, b, attrs, rng = _grid_model(case, batch_dim)
    rewritten, report = rewrite_model(model, method="dense")
    faithful(model, rewritten, report)
    (row,) = report.rows
    assert (row.lowering, row.note) == ("dense", None)
    assert {n.op_type for n in rewritten.graph.node} <= DENSE_OPS
    batches = (2,) if batch_dim == 2 else (0, 1, 3)  # an empty batch too, as Conv allows
    for n in batches:
        x = rng.standard_normal((n, *sample_shape)).astype(w.dtype)
        ref = _reference(model, x, w, b, attrs, explicit_pads, reference_conv)
        out = run(rewritten, {"X": x})[0]
        assert out.dtype == w.dtype
        close(out, ref, TOLERANCE[w.dtype.type], f"dense, batch {n}")


@pytest.mark.parametrize("case", GRID[::5], ids=[_grid_id(c) for c in GRID[::5]])
def test_builder_alone_is_the_conv(case, explicit_pads, reference_conv):
    """``x.flat @ dense_matrix`` per sample, in numpy only, equals the conv (bias apart)."""
    model, sample_shape, w, _, attrs, rng = _grid_model(case, 2)
    x = rng.standard_normal((2, *sample_shape))
    spec = conv_spec(model.graph.node[0], w.shape, x.shape)
    matrix = dense_matrix(w, spec)
    pads = explicit_pads(x.shape[2:], w.shape[2:], attrs["strides"], attrs["dilations"],
                         attrs.get("pads"), attrs.get("auto_pad", "NOTSET"))
    ref = reference_conv(x, w, None, attrs["strides"], attrs["dilations"], pads, attrs["group"])
    assert matrix.dtype == w.dtype
    assert matrix.shape == (x[0].size, ref[0].size)
    np.testing.assert_allclose(x.reshape(2, -1) @ matrix.astype(np.float64), ref.reshape(2, -1),
                               rtol=0, atol=1e-9 * max(1.0, np.abs(ref).max()))


def test_identity_kernel_gives_the_identity_matrix():
    """A centred 3x3 delta with 'same' padding is the identity map, so B is the identity."""
    w = np.zeros((1, 1, 3, 3), np.float32)
    w[0, 0, 1, 1] = 1
    model = conv_model((1, 1, 4, 5), w, pads=[1, 1, 1, 1])
    spec = conv_spec(model.graph.node[0], w.shape, (1, 1, 4, 5))
    np.testing.assert_array_equal(dense_matrix(w, spec), np.eye(20, dtype=np.float32))


def test_bias_is_repeated_per_output_position():
    rng = np.random.default_rng(3)
    w, b = random_conv(rng, 2, 3, (3, 3))
    rewritten, _ = rewrite_model(conv_model((1, 2, 5, 5), w, b, strides=[2, 2]), method="dense")
    inits = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    (add,) = [n for n in rewritten.graph.node if n.op_type == "Add"]
    np.testing.assert_array_equal(inits[add.input[1]], np.repeat(b, 4))


def test_symbolic_spatial_dims_fall_back_to_the_auto_choice():
    rng = np.random.default_rng(4)
    w, b = random_conv(rng, 3, 4, (3, 3))
    model = conv_model((1, 3, 8, 8), w, b, dims=["N", 3, "H", "W"], pads=[1, 1, 1, 1])
    rewritten, report = rewrite_model(model, method="dense")
    (row,) = report.rows
    assert row.lowering == "im2col"
    assert row.note == "dense does not apply: spatial size is not static; fell back to im2col"
    x = rng.standard_normal((2, 3, 9, 7)).astype(np.float32)
    np.testing.assert_allclose(run(rewritten, {"X": x})[0], run(model, {"X": x})[0],
                               rtol=1e-4, atol=1e-4)
    fixed, report = rewrite_model(model, method="dense", input_shapes={"X": (2, 3, 9, 7)})
    assert report.rows[0].lowering == "dense"


@pytest.mark.parametrize("kernel, auto_choice", [((3, 3), "im2col"), ((1, 1), "pointwise")])
def test_matrix_over_budget_falls_back_with_the_reason(kernel, auto_choice):
    rng = np.random.default_rng(5)
    w, b = random_conv(rng, 4, 4, kernel)
    model = conv_model((1, 4, 6, 6), w, b)
    needed = 4 * 36 * 4 * int(np.prod([7 - k for k in kernel])) * 4
    rewritten, report = rewrite_model(model, method="dense", max_dense_bytes=needed - 1)
    (row,) = report.rows
    assert row.lowering == auto_choice
    assert "over --max-dense-bytes" in row.note and row.note.endswith(f"fell back to {auto_choice}")
    assert row.weight_bytes_after < needed
    _, report = rewrite_model(model, method="dense", max_dense_bytes=needed)
    assert report.rows[0].lowering == "dense" and report.rows[0].weight_bytes_after >= needed

    text = io.StringIO()
    report_over = rewrite_model(model, method="dense", max_dense_bytes=needed - 1)[1]
    report_over.render(Console(file=text, width=300))
    assert f"{auto_choice} (fallback)" in text.getvalue()
    assert f"fallback: conv: dense does not apply: matrix [144, {4 * (7 - kernel[0])**2}]" in (
        text.getvalue())


def test_strict_makes_the_fallback_an_error():
    rng = np.random.default_rng(6)
    w, b = random_conv(rng, 4, 4, (3, 3))
    model = conv_model((1, 4, 6, 6), w, b)
    with pytest.raises(PlanError,
                       match=r"conv 'conv': dense does not apply: matrix .*KiB.*\(--strict\)"):
        rewrite_model(model, method="dense", strict=True, max_dense_bytes=1024)
    # a conv left out by --only is not the user's concern
    _, report = rewrite_model(model, method="dense", strict=True, max_dense_bytes=1024,
                              only=("other*",))
    assert report.rows[0].reason == "not selected by --only"


def test_cli_strict_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    rng = np.random.default_rng(7)
    w, b = random_conv(rng, 4, 4, (3, 3))
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(conv_model((1, 4, 6, 6), w, b), src)
    code = main(["rewrite", str(src), "-o", str(out), "--method", "dense", "--strict",
                 "--max-dense-bytes", "1KiB"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--strict" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["rewrite", str(src), "-o", str(out), "--method", "dense",
                 "--max-dense-bytes", "1KiB"]) == 0
    assert "fell back to im2col" in capsys.readouterr().out


@pytest.mark.parametrize("text, value", [("64MiB", 64 * 2**20), ("1GB", 10**9), ("4096", 4096),
                                         ("2.5kB", 2500), ("1KiB", 1024)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "MiB", "12 parsecs", "-1"])
def test_parse_bytes_refuses_nonsense(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def _zoo_model(member: str) -> Path:
    """A model fetched by tools/fetch_zoo.py into the cache; skip when it is not there."""
    cache = Path(os.environ.get("ONNX_CONVFC_ZOO", Path.home() / ".cache/onnx-convfc/zoo"))
    found = sorted(p for p in cache.rglob("model.onnx") if member in p.as_posix())
    if not found:
        pytest.skip(f"{member} not in the zoo cache {cache}: run tools/fetch_zoo.py "
                    "(or set ONNX_CONVFC_ZOO)")
    return found[0]


@pytest.mark.zoo
def test_mnist_becomes_a_fully_connected_network():
    path = _zoo_model("mnist-conv/")
    model = onnx.load(path)
    rewritten, report = rewrite_model(model, method="dense")
    assert [r.lowering for r in report.rows] == ["dense", "dense"], report.rows
    onnx.checker.check_model(rewritten, full_check=True)
    assert {n.op_type for n in rewritten.graph.node} <= {"MatMul", "Add", "Relu", "MaxPool",
                                                         "Reshape"}
    x = np.random.default_rng(8).uniform(0, 255, (1, 1, 28, 28)).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ours = ort.InferenceSession(rewritten.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    theirs = ort.InferenceSession(model.SerializeToString(), so,
                                  providers=["CPUExecutionProvider"])
    out = ours.run(None, {"Input3": x})[0]
    ref = theirs.run(None, {"Input3": x})[0]
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    assert out.argmax() == ref.argmax()
