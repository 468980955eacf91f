"""Hypothesis fuzzing: random conv geometries, rewritten by a random applicable method, run
by onnxruntime at a random optimisation level and compared with the numpy reference conv.

The numpy reference (checked against the definition in ``test_weights.py`` and against
onnxruntime's Conv in ``test_lowering_grid.py``) also covers SAME_* with dilation, which
onnxruntime's Conv refuses. Tensors stay tiny so a few hundred examples run in seconds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
from convmodels import conv_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_convfc import rewrite_model
from onnx_convfc.conv import conv_spec
from onnx_convfc.lowering import depthwise, patches, pointwise

AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")
LEVELS = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
TOLERANCE = {np.float32: 1e-4, np.float16: 5e-3}
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)


@dataclass(frozen=True)
class Geometry:
    c: int
    m: int
    group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begins + ends; only used with NOTSET
    auto_pad: str
    spatial: tuple[int, ...]  # the first input's spatial size
    grown: tuple[int, ...]  # the second input's, for symbolic spatial dims
    bias: bool
    dtype: type
    mode: str  # static | dyn_batch | dyn_all

    @property
    def rank(self) -> int:
        return len(self.kernel)

    def attrs(self) -> dict:
        attrs = dict(strides=list(self.strides), dilations=list(self.dilations),
                     group=self.group)
        if self.auto_pad == "NOTSET":
            attrs["pads"] = list(self.pads)
        else:
            attrs["auto_pad"] = self.auto_pad
        return attrs


@st.composite
def geometries(draw) -> Geometry:
    rank = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(("g1", "grouped", "depthwise", "depthwise_x")))
    if kind == "g1":
        group, c, m = 1, draw(st.integers(1, 4)), draw(st.integers(1, 5))
    elif kind == "grouped":
        group = draw(st.integers(2, 3))
        c, m = group * draw(st.integers(1, 2)), group * draw(st.integers(1, 2))
    else:
        c = group = draw(st.integers(1, 4))
        m = c * (draw(st.integers(2, 3)) if kind == "depthwise_x" else 1)
    axis = st.integers(1, 3 if rank < 3 else 2)
    kernel = tuple(draw(st.integers(1, 4 if rank < 3 else 3)) for _ in range(rank))
    strides = tuple(draw(axis) for _ in range(rank))
    dilations = tuple(draw(axis) for _ in range(rank))
    auto_pad = draw(st.sampled_from(AUTO_PADS))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(2 * rank))
    if auto_pad != "NOTSET":
        pads = (0,) * (2 * rank)
    spatial = []
    for i in range(rank):  # smallest size with a non-empty output, plus a little
        need = (kernel[i] - 1) * dilations[i] + 1 - pads[i] - pads[i + rank]
        least = 1 if auto_pad.startswith("SAME") else max(1, need)
        spatial.append(least + draw(st.integers(0, 4 if rank < 3 else 2)))
    grown = tuple(s + draw(st.integers(0, 3)) for s in spatial)
    return Geometry(c, m, group, kernel, strides, dilations, pads, auto_pad, tuple(spatial),
                    grown, draw(st.booleans()),
                    draw(st.sampled_from((np.float32,) * 4 + (np.float16,))),
                    draw(st.sampled_from(("static", "dyn_batch", "dyn_all"))))


def _pads_at(geo: Geometry, spatial, explicit_pads) -> list[int]:
    return explicit_pads(spatial, geo.kernel, geo.strides, geo.dilations, geo.pads, geo.auto_pad)


def _out(geo: Geometry, spatial, pads) -> list[int]:
    r = geo.rank
    return [(s + pads[i] + pads[i + r] - (geo.kernel[i] - 1) * geo.dilations[i] - 1)
            // geo.strides[i] + 1 for i, s in enumerate(spatial)]


def _applicable(geo: Geometry, explicit_pads) -> list[str]:
    methods = ["auto", "im2col"]
    if all(k == 1 for k in geo.kernel):
        methods.append("pointwise")
    out = _out(geo, geo.spatial, _pads_at(geo, geo.spatial, explicit_pads))
    if geo.group == 1 and geo.mode != "dyn_all" and all(o == 1 for o in out):
        methods.append("fc")
    return methods


def _model(geo: Geometry, rng) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray | None]:
    w = rng.standard_normal((geo.m, geo.c // geo.group, *geo.kernel)).astype(geo.dtype)
    b = rng.standard_normal(geo.m).astype(geo.dtype) if geo.bias else None
    dims = {"static": [2, geo.c, *geo.spatial], "dyn_batch": ["N", geo.c, *geo.spatial],
            "dyn_all": ["N", geo.c, *[f"S{i}" for i in range(geo.rank)]]}[geo.mode]
    return conv_model((2, geo.c, *geo.spatial), w, b, dims=dims, **geo.attrs()), w, b


@settings(FUZZ, max_examples=250)
@given(geo=geometries(), data=st.data())
def test_random_geometry_matches_reference(geo, data, explicit_pads, reference_conv, close,
                                           faithful):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    model, w, b = _model(geo, rng)
    method = data.draw(st.sampled_from(_applicable(geo, explicit_pads)), label="method")
    level = data.draw(st.sampled_from(LEVELS), label="level")
    rewritten, report = rewrite_model(model, method=method)
    faithful(model, rewritten, report)

    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(rewritten.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    shapes = {"static": [(2, geo.spatial)], "dyn_batch": [(1, geo.spatial), (3, geo.spatial)],
              "dyn_all": [(1, geo.spatial), (2, geo.grown)]}[geo.mode]
    for batch, spatial in shapes:  # one session, every size the model admits
        x = rng.standard_normal((batch, geo.c, *spatial)).astype(geo.dtype)
        pads = _pads_at(geo, spatial, explicit_pads)
        ref = reference_conv(x, w, b, geo.strides, geo.dilations, pads, geo.group)
        out = sess.run(None, {"X": x})[0]
        assert out.dtype == geo.dtype
        close(out, ref, TOLERANCE[geo.dtype], f"{report.rows[0].lowering} on {list(x.shape)}")


@settings(FUZZ, max_examples=150)
@given(geo=geometries())
def test_spec_geometry_matches_onnx_shape_inference(geo, explicit_pads):
    """``ConvSpec`` resolves pads and output sizes as ONNX shape inference does."""
    model, w, _ = _model(geo, np.random.default_rng(0))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    node = model.graph.node[0]
    known = geo.mode != "dyn_all"
    input_shape = (None, geo.c, *(geo.spatial if known else [None] * geo.rank))
    spec = conv_spec(node, w.shape, input_shape)
    want_pads = _pads_at(geo, geo.spatial, explicit_pads)
    out = _out(geo, geo.spatial, want_pads)
    assert (spec.in_channels, spec.out_channels, spec.group) == (geo.c, geo.m, geo.group)
    if known:
        assert list(spec.pads) == want_pads
        assert list(spec.output_spatial()) == out
        assert [d.dim_value for d in dims[2:]] == out
    elif geo.auto_pad.startswith("SAME") and any(s > 1 for s in geo.strides):
        assert spec.pads is None  # depends on the run-time size
    else:  # NOTSET, VALID and stride-1 SAME pads do not depend on the size
        assert list(spec.pads) == want_pads


@settings(FUZZ, max_examples=200)
@given(geo=geometries(), data=st.data())
def test_random_geometry_in_every_form_and_chunking(geo, data, explicit_pads, reference_conv,
                                                    close, faithful):
    """The forms' thresholds lowered or raised at random, so that tiny convs take every form
    and chunk size: Gather or Slice patches whatever the channels, runs of one row or column,
    one axis at a time or a Slice per tap, depthwise Gather or shift-add in runs, repeated
    scales or not, weight-left 1x1 convs."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    model, w, b = _model(geo, rng)
    tiny_or_huge = st.sampled_from([1, 1 << 40])
    knobs = {
        (patches, "SHORT_ROW_CHANNELS"): data.draw(st.sampled_from([1, 16, 1000]), "short"),
        (patches, "CHUNK_BYTES"): data.draw(tiny_or_huge, "im2col chunk"),
        (patches, "SMALL_PATCH_BYTES"): data.draw(st.sampled_from([0, 1 << 40]), "axis"),
        (patches, "RUNTIME_SHAPE_BYTES"): data.draw(tiny_or_huge, "runtime shape"),
        (depthwise, "CHUNK_BYTES"): data.draw(tiny_or_huge, "depthwise chunk"),
        (depthwise, "SHIFT_ADD_CHUNK_BYTES"): data.draw(tiny_or_huge, "shift-add run"),
        (depthwise, "TILED_SCALE_BYTES"): data.draw(st.sampled_from([0, 1 << 40]), "tiled"),
        (pointwise, "WEIGHT_LEFT_PIXELS"): 1,
    }
    gather = data.draw(st.booleans(), "depthwise gather")
    static = geo.mode != "dyn_all"
    shapes = [("X", (2, geo.c, *geo.spatial))] if data.draw(st.booleans(), "pinned") else []
    with contextlib.ExitStack() as stack:
        for (module, name), value in knobs.items():
            stack.enter_context(mock.patch.object(module, name, value))
        stack.enter_context(mock.patch.object(
            depthwise, "uses_gather", lambda spec: spec.is_static and gather))
        rewritten, report = rewrite_model(model, input_shapes=shapes if static else [],
                                          weight_left=data.draw(st.booleans(), "left"))
    faithful(model, rewritten, report)
    sess = ort.InferenceSession(rewritten.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    sizes = {"static": [(2, geo.spatial)], "dyn_batch": [(1, geo.spatial), (0, geo.spatial)],
             "dyn_all": [(1, geo.spatial), (2, geo.grown)]}[geo.mode]
    for batch, spatial in sizes:
        x = rng.standard_normal((batch, geo.c, *spatial)).astype(geo.dtype)
        ref = reference_conv(x, w, b, geo.strides, geo.dilations,
                             _pads_at(geo, spatial, explicit_pads), geo.group)
        close(sess.run(None, {"X": x})[0], ref, TOLERANCE[geo.dtype],
              f"{report.rows[0].lowering} on {list(x.shape)}")
