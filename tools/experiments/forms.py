"""Hand-built ONNX forms of a 2-D conv, for the layout and lowering experiments.

Each ``*_form`` appends the nodes of one exact conv form to a ``Builder`` and returns the
output name. Forms named ``nhwc_*`` take and give channels-last tensors, the others
channels-first; ``boundary`` wraps an NHWC form in the Transposes a per-conv lowering needs.
Shapes are static here: these graphs answer "which form is fastest", not "which is general".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_convfc.bench import compare_models, format_table, make_session

NCHW_TO_NHWC, NHWC_TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


@dataclass(frozen=True)
class Layer:
    """One 2-D conv: weight ``[M, C/g, k, k]``, square stride and symmetric pad."""

    weight: np.ndarray
    bias: np.ndarray | None
    size: int  # input height = width
    stride: int = 1
    pad: int = 0
    group: int = 1

    @property
    def k(self) -> int:
        return self.weight.shape[2]

    @property
    def c(self) -> int:
        return self.weight.shape[1] * self.group

    @property
    def m(self) -> int:
        return self.weight.shape[0]

    @property
    def out(self) -> int:
        return (self.size + 2 * self.pad - self.k) // self.stride + 1


def layer(c: int, m: int, k: int, size: int, stride: int = 1, pad: int | None = None,
          group: int = 1, seed: int = 0) -> Layer:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((m, c // group, k, k)) / np.sqrt(c // group * k * k))
    b = rng.standard_normal(m) * 0.1
    return Layer(w.astype(np.float32), b.astype(np.float32), size, stride,
                 k // 2 if pad is None else pad, group)


class Builder:
    """Appends nodes and initializers; ``model`` wraps them with input ``X``."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, array: np.ndarray) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, np.int64))

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def model(self, x_shape, out: str, opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        return model


# ---- weights (numpy), rows ordered as the patches are ---------------------------------

def rows_tap_channel(w: np.ndarray) -> np.ndarray:
    """``[k*k*C, M]``: row ``tap*C + c`` (patches concatenated per tap, channels inside)."""
    return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def rows_channel_tap(w: np.ndarray) -> np.ndarray:
    """``[C*k*k, M]``: row ``c*k*k + tap``."""
    return w.reshape(w.shape[0], -1).T


# ---- forms ------------------------------------------------------------------------

def _act(b: Builder, y: str, act: str | None) -> str:
    """Apply an activation by op type; ``Clip`` is Relu6 (0..6)."""
    if act == "Clip":
        return b.op("Clip", y, b.const(np.float32(0)), b.const(np.float32(6)))
    return b.op(act, y) if act else y


def conv_form(b: Builder, x: str, ly: Layer, act: str | None = None) -> str:
    ins = [x, b.const(ly.weight)] + ([b.const(ly.bias)] if ly.bias is not None else [])
    return _act(b, b.op("Conv", *ins, kernel_shape=[ly.k, ly.k], strides=[ly.stride] * 2,
                        pads=[ly.pad] * 4, group=ly.group), act)


def _taps(b: Builder, x: str, ly: Layer, axes: list[int], stack: int) -> str:
    """One strided Slice per kernel offset over the (already padded) spatial ``axes``."""
    span = (ly.out - 1) * ly.stride + 1
    axes_c, steps = b.ints(axes), b.ints([ly.stride] * 2)
    pieces = []
    for i in range(ly.k):
        for j in range(ly.k):
            pieces.append(b.op("Slice", x, b.ints([i, j]), b.ints([i + span, j + span]),
                               axes_c, steps))
    return b.op("Concat", *pieces, axis=stack)


def _pad(b: Builder, x: str, ly: Layer, nhwc: bool) -> str:
    if not ly.pad:
        return x
    p = ly.pad
    pads = [0, p, p, 0, 0, p, p, 0] if nhwc else [0, 0, p, p, 0, 0, p, p]
    return b.op("Pad", x, b.ints(pads))


def nhwc_im2col_form(b: Builder, x: str, ly: Layer, gemm2d: bool = False,
                     act: str | None = None) -> str:
    """Pad, k*k strided Slices, Concat, MatMul (weight B), Add; optionally on 2-D rows."""
    x = _pad(b, x, ly, nhwc=True)
    patches = _taps(b, x, ly, [1, 2], stack=-1) if ly.k > 1 or ly.stride > 1 else x
    return _nhwc_gemm(b, patches, rows_tap_channel(ly.weight), ly, gemm2d, act)


def _nhwc_gemm(b: Builder, patches: str, matrix: np.ndarray, ly: Layer, gemm2d: bool,
               act: str | None) -> str:
    """MatMul with weight B, bias Add, activation; on 2-D rows when ``gemm2d``."""
    if gemm2d:
        patches = b.op("Reshape", patches, b.ints([-1, matrix.shape[0]]))
    y = b.op("MatMul", patches, b.const(matrix))
    if ly.bias is not None:
        y = b.op("Add", y, b.const(ly.bias))
    y = _act(b, y, act)
    if gemm2d:
        y = b.op("Reshape", y, b.ints([-1, ly.out, ly.out, ly.m]))
    return y


def nchw_wleft_form(b: Builder, x: str, ly: Layer, act: str | None = None) -> str:
    """Pad, k*k strided Slices, Concat on channels, weight-left MatMul ``W @ X``, Add."""
    x = _pad(b, x, ly, nhwc=False)
    patches = _taps(b, x, ly, [2, 3], stack=1) if ly.k > 1 or ly.stride > 1 else x
    return _wleft_gemm(b, patches, rows_tap_channel(ly.weight).T, ly, act)


def _wleft_gemm(b: Builder, patches: str, matrix: np.ndarray, ly: Layer,
                act: str | None = None) -> str:
    flat = b.op("Reshape", patches, b.ints([0, matrix.shape[1], -1]))
    y = b.op("MatMul", b.const(matrix), flat)
    if ly.bias is not None:
        y = b.op("Add", y, b.const(ly.bias.reshape(-1, 1)))
    y = _act(b, y, act)
    return b.op("Reshape", y, b.ints([0, ly.m, ly.out, ly.out]))


def _gather_index(ly: Layer) -> np.ndarray:
    """``[k*k, OH*OW]`` flat positions in the padded image of each tap and output pixel."""
    side = ly.size + 2 * ly.pad
    o = np.arange(ly.out) * ly.stride
    tap = np.arange(ly.k)
    rows = (tap[:, None, None, None] + o[None, None, :, None]) * side
    cols = tap[None, :, None, None] + o[None, None, None, :]
    return (rows + cols).reshape(ly.k * ly.k, -1).astype(np.int64)


def nchw_gather_wleft_form(b: Builder, x: str, ly: Layer, act: str | None = None) -> str:
    """Pad, flatten pixels, one Gather with precomputed indices, weight-left MatMul."""
    x = b.op("Reshape", _pad(b, x, ly, nhwc=False), b.ints([0, ly.c, -1]))
    patches = b.op("Gather", x, b.const(_gather_index(ly)), axis=2)  # [N, C, taps, L]
    return _wleft_gemm(b, patches, rows_channel_tap(ly.weight).T, ly, act)


def nhwc_gather_form(b: Builder, x: str, ly: Layer, gemm2d: bool = False,
                     act: str | None = None, index_dtype=np.int64) -> str:
    """Pad, flatten pixels, one Gather (indices ``[L, taps]``), MatMul with weight B."""
    x = b.op("Reshape", _pad(b, x, ly, nhwc=True), b.ints([0, -1, ly.c]))
    index = _gather_index(ly).T.astype(index_dtype)
    patches = b.op("Gather", x, b.const(index), axis=1)  # [N, L, taps, C]
    patches = b.op("Reshape", patches, b.ints([0, ly.out, ly.out, -1]))
    return _nhwc_gemm(b, patches, rows_tap_channel(ly.weight), ly, gemm2d, act)


def s2d_weight(ly: Layer) -> np.ndarray:
    """Weight of the stride-1 conv over ``SpaceToDepth(stride)`` of the padded input.

    ``[M, s*s*C, kq, kq]`` with ``kq = ceil(k / s)``; channel ``(bh*s + bw)*C + c``
    (DCR order) at tap ``(i, j)`` holds ``W[m, c, i*s + bh, j*s + bw]``, zero past the kernel.
    """
    s, k = ly.stride, ly.k
    kq = -(-k // s)
    full = np.zeros((ly.m, ly.c, kq * s, kq * s), np.float32)
    full[:, :, :k, :k] = ly.weight
    # [M, C, i, bh, j, bw] -> [M, bh, bw, C, i, j]
    full = full.reshape(ly.m, ly.c, kq, s, kq, s).transpose(0, 3, 5, 1, 2, 4)
    return np.ascontiguousarray(full.reshape(ly.m, s * s * ly.c, kq, kq))


def s2d_form(b: Builder, x: str, ly: Layer, inner: Callable | None = None, **kw) -> str:
    """Exact strided conv: Pad (to ``s*(out + kq - 1)``), SpaceToDepth, stride-1 conv form."""
    s = ly.stride
    kq = -(-ly.k // s)
    side = s * (ly.out + kq - 1)
    extra = side - (ly.size + 2 * ly.pad)
    pads = [0, 0, ly.pad, ly.pad, 0, 0, ly.pad + extra, ly.pad + extra]
    if any(pads):
        x = b.op("Pad", x, b.ints(pads))
    x = b.op("SpaceToDepth", x, blocksize=s)
    inner_layer = Layer(s2d_weight(ly), ly.bias, side // s, 1, 0, 1)
    return (inner or nchw_wleft_form)(b, x, inner_layer, **kw)


def boundary(form: Callable) -> Callable:
    """NCHW -> NHWC Transpose, the NHWC form, NHWC -> NCHW Transpose (one lowered conv)."""

    def wrapped(b: Builder, x: str, ly: Layer, **kw) -> str:
        y = form(b, b.op("Transpose", x, perm=NCHW_TO_NHWC), ly, **kw)
        return b.op("Transpose", y, perm=NHWC_TO_NCHW)

    return wrapped


def single(form: Callable, ly: Layer, batch: int = 1, **kw) -> onnx.ModelProto:
    b = Builder()
    return b.model([batch, ly.c, ly.size, ly.size], form(b, "X", ly, **kw))


# ---- running ----------------------------------------------------------------------

def check_and_compare(models: Mapping[str, onnx.ModelProto], feeds: Mapping[str, np.ndarray],
                      threads=(2, 1), repeats: int = 40, title: str = "",
                      unchecked: tuple[str, ...] = ()) -> dict:
    """Assert every model (but ``unchecked``) matches the first one, time them interleaved."""
    ref = make_session(next(iter(models.values())), 1).run(None, feeds)[0]
    scale = float(np.abs(ref).max())
    for label, model in models.items():
        if label in unchecked:
            continue
        out = make_session(model, 1).run(None, feeds)[0]
        err = float(np.abs(out - ref).max()) if out.shape == ref.shape else np.inf
        if err > 1e-4 * max(scale, 1.0):
            raise SystemExit(f"{title}: {label} is not the same conv (max abs error {err:.2e}, "
                             f"output scale {scale:.2e})")
    results = compare_models(models, feeds, threads=threads, repeats=repeats)
    print(f"\n## {title}")
    print(format_table(results, "CPUExecutionProvider"))
    return results


def feeds_for(ly: Layer, batch: int = 1, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"X": rng.standard_normal((batch, ly.c, ly.size, ly.size)).astype(np.float32)}

