"""Every lowering over the whole grid of Conv geometry, against onnxruntime's own Conv.

Geometry: 1-D/2-D/3-D; strides; dilations; asymmetric explicit pads; auto_pad NOTSET, VALID,
SAME_UPPER, SAME_LOWER; group 1, grouped, depthwise, depthwise with channel multiplier; with
and without bias; fp32 and fp16. Shapes: static, symbolic batch, symbolic batch and spatial
(two different sizes through the same rewritten model). Each method that applies, at
ORT_ENABLE_ALL and ORT_DISABLE_ALL. onnxruntime refuses SAME_* with dilation > 1, so those
cases are compared with the numpy reference instead.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from convmodels import conv_model, session

from onnx_convfc import rewrite_model

LEVELS = {"opt_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
          "opt_none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
TOLERANCE = {np.float32: 1e-4, np.float16: 5e-3}  # of max(1, max|reference|)

# in channels, out channels, group
GROUPS = {"g1": (4, 6, 1), "grouped": (6, 9, 3), "depthwise": (4, 4, 4), "dwx2": (3, 6, 3)}
SPATIAL = (11, 9, 8)  # truncated to the rank
SPATIAL_FULL = (5, 4, 3)  # whole-input kernels stay small: im2col cuts one Slice per tap
GROWN = (3, 1, 2)  # the second run of a dynamic-spatial model adds this
AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")
# strides, dilations (rank-3 values, truncated to the rank)
STEPS = {"s1d1": ((1, 1, 1), (1, 1, 1)), "s2d1": ((2, 1, 3), (1, 1, 1)),
         "s1d2": ((1, 1, 1), (2, 1, 2)), "s2d3": ((2, 3, 1), (3, 2, 1))}
PADS = ((1, 0, 2), (0, 2, 1))  # begins, ends: asymmetric on purpose
SHAPE_MODES = ("static", "dyn_batch", "dyn_all")


@dataclass(frozen=True)
class Case:
    rank: int
    groups: str
    kernel_kind: str  # k3 | k1 | full (kernel spans the padded input)
    steps: str
    auto_pad: str
    bias: bool
    dtype: type

    @property
    def id(self) -> str:
        return (f"{self.rank}d-{self.groups}-{self.kernel_kind}-{self.steps}-{self.auto_pad}"
                f"{'-bias' if self.bias else ''}-{np.dtype(self.dtype).name}")

    def geometry(self) -> dict:
        r = self.rank
        strides, dilations = (tuple(v[:r]) for v in STEPS[self.steps])
        spatial = (SPATIAL_FULL if self.kernel_kind == "full" else SPATIAL)[:r]
        pads = PADS[0][:r] + PADS[1][:r] if self.auto_pad == "NOTSET" else (0,) * (2 * r)
        if self.kernel_kind == "k3":
            kernel = (3, 2, 3)[:r]
        elif self.kernel_kind == "k1":
            kernel = (1,) * r
        else:  # the largest kernel that fits the padded input
            padded = [s + pads[i] + pads[i + r] for i, s in enumerate(spatial)]
            kernel = tuple((p - 1) // d + 1 for p, d in zip(padded, dilations))
        c, m, group = GROUPS[self.groups]
        return dict(c=c, m=m, group=group, kernel=kernel, strides=strides,
                    dilations=dilations, pads=pads, spatial=spatial)


def _grid() -> list[Case]:
    cases = []
    # every rank x auto_pad x group kind, 3-wide kernels; steps, bias and dtype rotate
    for i, (rank, pad, groups) in enumerate(itertools.product((1, 2, 3), AUTO_PADS, GROUPS)):
        cases.append(Case(rank, groups, "k3", list(STEPS)[i % 4], pad, i % 2 == 0,
                          np.float16 if i % 5 == 0 else np.float32))
    # pointwise and whole-input kernels under every stride/dilation
    for i, (rank, kind, steps) in enumerate(itertools.product((1, 2, 3), ("k1", "full"), STEPS)):
        groups = list(GROUPS)[i % 4] if kind == "k1" or i % 4 == 3 else "g1"
        cases.append(Case(rank, groups, kind, steps, AUTO_PADS[(i + rank) % 4], i % 2 == 1,
                          np.float16 if i % 3 == 0 else np.float32))
    # the fc lowering's home: group 1, whole-input kernels, explicit or no padding
    for i, (rank, pad, steps) in enumerate(itertools.product((1, 2, 3), AUTO_PADS[:2], STEPS)):
        cases.append(Case(rank, "g1", "full", steps, pad, i % 3 != 0,
                          np.float16 if i % 4 == 1 else np.float32))
    return sorted(set(cases), key=lambda c: c.id)


GRID = _grid()


def expected_methods(case: Case, mode: str, explicit_pads) -> set[str]:
    """Which lowerings may take the conv, derived from the geometry alone."""
    g = case.geometry()
    methods = {"im2col"}
    if all(k == 1 for k in g["kernel"]):
        methods.add("pointwise")
    if g["group"] > 1 and g["c"] == g["group"]:
        methods.add("depthwise")
    pads = explicit_pads(g["spatial"], g["kernel"], g["strides"], g["dilations"], g["pads"],
                         case.auto_pad)
    out = _out_spatial(g["spatial"], g["kernel"], g["strides"], g["dilations"], pads)
    if g["group"] == 1 and mode != "dyn_all" and all(o == 1 for o in out):
        methods.add("fc")
    return methods


def auto_choice(methods: set[str]) -> str:
    return next(m for m in ("fc", "depthwise", "pointwise", "im2col") if m in methods)


def _out_spatial(spatial, kernel, strides, dilations, pads):
    r = len(kernel)
    return [(s + pads[i] + pads[i + r] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
            for i, s in enumerate(spatial)]


def _feeds(case: Case, mode: str, rng) -> list[np.ndarray]:
    """One input for a static model; for dynamic ones other batches (empty too, which Conv
    accepts) and, with symbolic spatial dims, another spatial size (the empty batch there is
    ``test_empty_batch_with_symbolic_spatial_dims``)."""
    g = case.geometry()
    spatial = tuple(g["spatial"])
    if mode == "static":
        shapes = [(2, g["c"], *spatial)]
    elif mode == "dyn_batch":
        shapes = [(1, g["c"], *spatial), (3, g["c"], *spatial), (0, g["c"], *spatial)]
    else:
        grown = tuple(s + d for s, d in zip(spatial, GROWN))
        shapes = [(1, g["c"], *spatial), (3, g["c"], *grown)]
    return [rng.standard_normal(s).astype(case.dtype) for s in shapes]


def _build(case: Case, mode: str, rng) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray | None]:
    g = case.geometry()
    w = rng.standard_normal((g["m"], g["c"] // g["group"], *g["kernel"])).astype(case.dtype)
    b = rng.standard_normal(g["m"]).astype(case.dtype) if case.bias else None
    r = case.rank
    dims = {"static": [2, g["c"], *g["spatial"]], "dyn_batch": ["N", g["c"], *g["spatial"]],
            "dyn_all": ["N", g["c"], *["HWD"[i] for i in range(r)]]}[mode]
    attrs = dict(strides=list(g["strides"]), dilations=list(g["dilations"]), group=g["group"])
    if case.auto_pad == "NOTSET":
        attrs["pads"] = list(g["pads"])
    else:
        attrs["auto_pad"] = case.auto_pad
    model = conv_model((2, g["c"], *g["spatial"]), w, b, dims=dims, **attrs)
    model.doc_string = "grid model"
    model.producer_name = "test_lowering_grid"
    onnx.helper.set_model_props(model, {"case": case.id})
    return model, w, b


def _references(case: Case, model, w, b, feeds, explicit_pads, reference_conv):
    g = case.geometry()
    if case.auto_pad.startswith("SAME") and any(d > 1 for d in g["dilations"]):
        refs = []  # onnxruntime refuses this combination; the numpy reference does not
        for x in feeds:
            pads = explicit_pads(x.shape[2:], g["kernel"], g["strides"], g["dilations"],
                                 None, case.auto_pad)
            ref = reference_conv(x, w, b, g["strides"], g["dilations"], pads, g["group"])
            refs.append(ref.astype(case.dtype))
        return refs
    sess = session(model, LEVELS["opt_all"])
    return [sess.run(None, {"X": x})[0] for x in feeds]


@pytest.mark.parametrize("mode", SHAPE_MODES)
@pytest.mark.parametrize("case", GRID, ids=[c.id for c in GRID])
def test_rewritten_conv_matches_onnxruntime_conv(case, mode, explicit_pads, reference_conv,
                                                 close, faithful):
    rng = np.random.default_rng(zlib.crc32(f"{case.id}/{mode}".encode()))
    model, w, b = _build(case, mode, rng)
    pristine = model.SerializeToString()
    feeds = _feeds(case, mode, rng)
    refs = _references(case, model, w, b, feeds, explicit_pads, reference_conv)
    applicable = expected_methods(case, mode, explicit_pads)

    for method in ("auto", "pointwise", "fc", "depthwise", "im2col"):
        rewritten, report = rewrite_model(model, method=method)
        assert model.SerializeToString() == pristine, "rewrite_model changed its input"
        if method != "auto" and method not in applicable:
            faithful(model, rewritten, report, lowered=False)
            assert report.rows[0].reason.startswith(f"{method} does not apply: ")
            continue
        faithful(model, rewritten, report)
        want = auto_choice(applicable) if method == "auto" else method
        assert report.rows[0].lowering == want
        _check_weight_layout(rewritten, w, case, report.rows[0].lowering)
        for level_name, level in LEVELS.items():
            sess = session(rewritten, level)
            for x, ref in zip(feeds, refs):
                out = sess.run(None, {"X": x})[0]
                assert out.dtype == case.dtype
                close(out, ref, TOLERANCE[case.dtype],
                      f"{method} at {level_name}, input {list(x.shape)}")


def _check_weight_layout(model: onnx.ModelProto, w: np.ndarray, case: Case,
                         lowering: str) -> None:
    """FC form: B of the MatMul is ``[K, M]`` (group 1) or ``[g, K/g, M/g]``, conv dtype.
    Depthwise convs have no GEMM: their per-tap scales hold the weight's numbers (shift-add
    may repeat them along the output's last axis, ``[W, C]`` or ``[W, taps, C]``)."""
    inits = {t.name: t for t in model.graph.initializer}
    if lowering == "depthwise":
        assert "MatMul" not in {n.op_type for n in model.graph.node}
        names = {n.input[1] for n in model.graph.node if n.op_type == "Mul"}
        scales = [onnx.numpy_helper.to_array(inits[name]) for name in sorted(names)]
        scales = [_unrepeated(s) for s in scales]
        values = np.concatenate([s.ravel() for s in scales if s.dtype == w.dtype])
        np.testing.assert_array_equal(np.sort(values), np.sort(w, axis=None))
        return
    (matmul,) = [n for n in model.graph.node if n.op_type == "MatMul"]
    weight = onnx.numpy_helper.to_array(inits[matmul.input[1]])
    m, c_g = w.shape[:2]
    group = GROUPS[case.groups][2]
    k = c_g * int(np.prod(w.shape[2:]))
    assert weight.shape == ((k, m) if group == 1 else (group, k, m // group))
    assert weight.dtype == w.dtype
    # the same numbers, only moved
    np.testing.assert_array_equal(np.sort(weight, axis=None), np.sort(w, axis=None))


def _unrepeated(scale: np.ndarray) -> np.ndarray:
    """One row of a scale repeated along its first axis."""
    repeated = scale.ndim >= 2 and scale.shape[0] > 1 and (scale == scale[:1]).all()
    return scale[:1] if repeated else scale


def test_grid_covers_every_geometry_axis(explicit_pads):
    """Guard against the grid silently losing a dimension when edited."""
    assert {c.rank for c in GRID} == {1, 2, 3}
    assert {c.auto_pad for c in GRID} == set(AUTO_PADS)
    assert {c.groups for c in GRID} == set(GROUPS)
    assert {c.steps for c in GRID} == set(STEPS)
    assert {c.kernel_kind for c in GRID} == {"k3", "k1", "full"}
    assert {c.bias for c in GRID} == {True, False}
    assert {c.groups for c in GRID if c.dtype == np.float16} == set(GROUPS)
    methods = set()
    for case in GRID:
        for mode in SHAPE_MODES:
            methods |= expected_methods(case, mode, explicit_pads)
    assert methods == {"pointwise", "fc", "depthwise", "im2col"}


@pytest.mark.parametrize("level", [
    "opt_none",
    pytest.param("opt_all", marks=pytest.mark.xfail(strict=True, reason=(
        "onnxruntime's Reshape fusion turns the run-time group shape into one with -1, "
        "which an empty batch cannot resolve (onnxruntime 1.32)"))),
])
@pytest.mark.parametrize("rank", [1, 2])
def test_empty_batch_with_symbolic_spatial_dims(rank, level):
    """A grouped conv with symbolic spatial dims still takes an empty batch, as Conv does."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 2, *[3] * rank)).astype(np.float32)
    model = conv_model((1, 6, *[5] * rank), w, dims=["N", 6, *"HW"[:rank]], group=3)
    rewritten, _ = rewrite_model(model)
    x = np.zeros((0, 6, *[7] * rank), np.float32)
    out = session(rewritten, LEVELS[level]).run(None, {"X": x})[0]
    assert out.shape == (0, 6, *[5] * rank)


@pytest.mark.parametrize("opset", [9, 11, 13, 18, 21, 24])
def test_every_opset_from_the_first_conv_on(opset, close, faithful):
    """Grouped, SAME_UPPER, stride 2, symbolic spatial dims: run-time pads in int64 shape math.
    Opsets below 11 are upgraded (Pad and Slice take inputs from 11 on), and say so."""
    rng = np.random.default_rng(opset)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    model = conv_model((1, 4, 7, 7), w, b, opset=opset, dims=["N", 4, "H", "W"], group=2,
                       strides=[2, 2], auto_pad="SAME_UPPER")
    rewritten, report = rewrite_model(model)
    if opset < 11:
        assert any(f"from {opset} to 11" in note for note in report.notes)
        model = onnx.version_converter.convert_version(model, 11)
    faithful(model, rewritten, report)
    ref_sess, sess = (session(m, LEVELS["opt_all"]) for m in (model, rewritten))
    for shape in [(1, 4, 7, 7), (2, 4, 10, 5)]:
        x = rng.standard_normal(shape).astype(np.float32)
        close(sess.run(None, {"X": x})[0], ref_sess.run(None, {"X": x})[0], 1e-4, str(shape))


_W = np.ones((6, 4, 3, 3), np.float32)
# Convs whose attributes contradict their weight or input: skipped with a reason, never a crash.
UNLOWERABLE = {
    "group does not divide": (lambda: conv_model((1, 16, 5, 5), _W, group=4),
                              "invalid conv: group=4 does not divide the 6 output channels"),
    "kernel_shape contradicts": (lambda: conv_model((1, 4, 5, 5), _W, kernel_shape=[2, 2]),
                                 "invalid conv: kernel_shape=[2, 2] contradicts weight"),
    "channels": (lambda: conv_model((1, 5, 5, 5), _W), "invalid conv: input has 5 channels"),
    "bias shape": (lambda: conv_model((1, 4, 5, 5), _W, np.ones(5, np.float32)),
                   "bias shape [5] is not [6]"),
    "kernel larger than input": (lambda: conv_model((1, 4, 2, 2), _W),
                                 "invalid conv: the kernel is larger than the padded input"),
    "stride 0": (lambda: conv_model((1, 4, 5, 5), _W, strides=[0, 1]),
                 "invalid conv: strides=[0, 1]"),
    "short pads": (lambda: conv_model((1, 4, 5, 5), _W, pads=[1, 1]),
                   "invalid conv: pads=[1, 1]"),
    "unknown auto_pad": (lambda: conv_model((1, 4, 5, 5), _W, auto_pad="FULL"),
                         "invalid conv: unknown auto_pad='FULL'"),
}


@pytest.mark.parametrize("case", UNLOWERABLE)
def test_unlowerable_conv_is_skipped_with_its_reason(case):
    build, reason = UNLOWERABLE[case]
    model = build()
    rewritten, report = rewrite_model(model)
    (row,) = report.rows
    assert row.lowering is None and row.reason.startswith(reason), row.reason
    assert [n.op_type for n in rewritten.graph.node] == [n.op_type for n in model.graph.node]
