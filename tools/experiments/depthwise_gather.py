"""Depthwise, second round (issue 7): Gather-based forms against shift-add, 3x3 and 5x5.

PP-OCR's depthwise convs are 5x5, where shift-add needs 25 Slices, 25 Muls and 24 Adds.
Forms, each checked against onnxruntime's Conv (group = C) before timing, all channels-first
(no Transposes):
  batched_matmul   today's lowering (see ``depthwise.py``)
  shift_add        Pad, one Slice per tap, per-channel Mul, Add chain
  gather_matmul    Pad, Reshape [N, C, pixels], one Gather with int32 indices [L, taps]
                   -> [N, C, L, taps], MatMul with B = [C, taps, 1] (FC form), Reshape
  gather_reduce    same Gather, Mul by [C, 1, taps], ReduceSum over the last axis
  gather_t_reduce  Gather with indices [taps, L] -> [N, C, taps, L], Mul by [C, taps, 1],
                   ReduceSum over the tap axis (contiguous inner rows)
  gather_t_wleft   same Gather, weight-left MatMul [C, 1, taps] @ [N, C, taps, L]
  shift_sum        shift-add with one variadic Sum instead of the Add chain
  nhwc_shift_add   shift-add channels-last, Transposes at both ends
  nhwc_gather_reduce  channels-last: Pad, Reshape [N, pixels, C], Gather of whole C-rows
                   (int32 [L, taps]) -> [N, L, taps, C], Mul by [taps, C], ReduceSum over
                   taps, Transposes at both ends

Run: python tools/experiments/depthwise_gather.py [--repeats 40]
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np
from depthwise import _pad, batched_matmul, nchw_shift_add, nhwc_shift_add
from forms import (
    NCHW_TO_NHWC,
    NHWC_TO_NCHW,
    Builder,
    Layer,
    boundary,
    check_and_compare,
    conv_form,
    feeds_for,
    layer,
    single,
)

CASES = ((3, 32, 112, 1), (3, 64, 56, 1), (3, 128, 56, 2), (3, 128, 28, 1), (3, 256, 14, 1),
         (5, 192, 40, 1), (5, 384, 20, 1), (5, 480, 10, 1), (5, 192, 80, 2))


def _index(ly: Layer, taps_first: bool) -> np.ndarray:
    """Flat positions in the padded map: ``[L, taps]`` or ``[taps, L]``, int32."""
    side = ly.size + 2 * ly.pad
    o = np.arange(ly.out) * ly.stride
    t = np.arange(ly.k)
    rows = (o[:, None, None, None] + t[None, None, :, None]) * side
    cols = o[None, :, None, None] + t[None, None, None, :]
    index = (rows + cols).reshape(ly.out * ly.out, ly.k * ly.k)  # [L, taps]
    return (index.T if taps_first else index).astype(np.int32).copy()


def _gathered(b: Builder, x: str, ly: Layer, taps_first: bool) -> str:
    x = b.op("Reshape", _pad(b, x, ly, (2, 3), 4), b.ints([0, ly.c, -1]))
    return b.op("Gather", x, b.const(_index(ly, taps_first)), axis=2)


def _finish(b: Builder, y: str, ly: Layer) -> str:
    y = b.op("Reshape", y, b.ints([0, ly.c, ly.out, ly.out]))
    return b.op("Add", y, b.const(ly.bias.reshape(-1, 1, 1)))


def gather_matmul(b: Builder, x: str, ly: Layer) -> str:
    patches = _gathered(b, x, ly, taps_first=False)  # [N, C, L, taps]
    return _finish(b, b.op("MatMul", patches, b.const(ly.weight.reshape(ly.c, -1, 1))), ly)


def gather_reduce(b: Builder, x: str, ly: Layer) -> str:
    patches = _gathered(b, x, ly, taps_first=False)
    y = b.op("Mul", patches, b.const(ly.weight.reshape(ly.c, 1, -1)))
    return _finish(b, b.op("ReduceSum", y, b.ints([-1]), keepdims=0), ly)


def gather_t_reduce(b: Builder, x: str, ly: Layer) -> str:
    patches = _gathered(b, x, ly, taps_first=True)  # [N, C, taps, L]
    y = b.op("Mul", patches, b.const(ly.weight.reshape(ly.c, -1, 1)))
    return _finish(b, b.op("ReduceSum", y, b.ints([2]), keepdims=0), ly)


def gather_t_wleft(b: Builder, x: str, ly: Layer) -> str:
    patches = _gathered(b, x, ly, taps_first=True)
    return _finish(b, b.op("MatMul", b.const(ly.weight.reshape(ly.c, 1, -1)), patches), ly)


def shift_sum(b: Builder, x: str, ly: Layer) -> str:
    x = _pad(b, x, ly, (2, 3), 4)
    span = (ly.out - 1) * ly.stride + 1
    axes, steps = b.ints([2, 3]), b.ints([ly.stride] * 2)
    scales = ly.weight.reshape(ly.c, -1).T
    terms = []
    for tap in range(ly.k * ly.k):
        i, j = divmod(tap, ly.k)
        piece = b.op("Slice", x, b.ints([i, j]), b.ints([i + span, j + span]), axes, steps)
        terms.append(b.op("Mul", piece, b.const(scales[tap].reshape(-1, 1, 1).copy())))
    return b.op("Add", b.op("Sum", *terms), b.const(ly.bias.reshape(-1, 1, 1)))


def nhwc_gather_reduce(b: Builder, x: str, ly: Layer) -> str:
    x = b.op("Transpose", x, perm=NCHW_TO_NHWC)
    x = b.op("Reshape", _pad(b, x, ly, (1, 2), 4), b.ints([0, -1, ly.c]))
    patches = b.op("Gather", x, b.const(_index(ly, taps_first=False)), axis=1)
    y = b.op("Mul", patches, b.const(ly.weight.reshape(ly.c, -1).T.copy()))
    y = b.op("ReduceSum", y, b.ints([2]), keepdims=0)  # [N, L, C]
    y = b.op("Add", y, b.const(ly.bias))
    y = b.op("Reshape", y, b.ints([0, ly.out, ly.out, ly.c]))
    return b.op("Transpose", y, perm=NHWC_TO_NCHW)


def nhwc_gather_t_reduce(b: Builder, x: str, ly: Layer) -> str:
    x = b.op("Transpose", x, perm=NCHW_TO_NHWC)
    x = b.op("Reshape", _pad(b, x, ly, (1, 2), 4), b.ints([0, -1, ly.c]))
    patches = b.op("Gather", x, b.const(_index(ly, taps_first=True)), axis=1)  # [N,taps,L,C]
    y = b.op("Mul", patches, b.const(ly.weight.reshape(ly.c, -1).T.copy()[:, None, :]))
    y = b.op("ReduceSum", y, b.ints([1]), keepdims=0)  # [N, L, C]
    y = b.op("Add", y, b.const(ly.bias))
    y = b.op("Reshape", y, b.ints([0, ly.out, ly.out, ly.c]))
    return b.op("Transpose", y, perm=NHWC_TO_NCHW)


def nhwc_gather_chunked(b: Builder, x: str, ly: Layer, chunk_bytes: int = 1 << 20) -> str:
    x = b.op("Transpose", x, perm=NCHW_TO_NHWC)
    x = b.op("Reshape", _pad(b, x, ly, (1, 2), 4), b.ints([0, -1, ly.c]))
    index = _index(ly, taps_first=False)
    per_row = ly.k * ly.k * ly.c * 4
    rows = max(1, chunk_bytes // per_row)
    w = b.const(ly.weight.reshape(ly.c, -1).T.copy())
    parts = []
    for start in range(0, len(index), rows):
        patches = b.op("Gather", x, b.const(index[start:start + rows].copy()), axis=1)
        parts.append(b.op("ReduceSum", b.op("Mul", patches, w), b.ints([2]), keepdims=0))
    y = b.op("Concat", *parts, axis=1) if len(parts) > 1 else parts[0]
    y = b.op("Add", y, b.const(ly.bias))
    y = b.op("Reshape", y, b.ints([0, ly.out, ly.out, ly.c]))
    return b.op("Transpose", y, perm=NHWC_TO_NCHW)


FORMS = {"conv": conv_form, "batched_matmul": batched_matmul, "shift_add": nchw_shift_add,
         "gather_matmul": gather_matmul, "gather_reduce": gather_reduce,
         "gather_t_reduce": gather_t_reduce, "gather_t_wleft": gather_t_wleft,
         "shift_sum": shift_sum, "nhwc_shift_add": boundary(nhwc_shift_add),
         "nhwc_gather_reduce": nhwc_gather_reduce, "nhwc_gather_t_reduce": nhwc_gather_t_reduce,
         "nhwc_gather_chunked": nhwc_gather_chunked,
         **{f"chunked_{kib}k": partial(nhwc_gather_chunked, chunk_bytes=kib << 10)
            for kib in (128, 256, 512, 2048)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", default="1", help="comma-separated thread counts")
    parser.add_argument("--forms", default=",".join(FORMS), help="comma-separated forms")
    args = parser.parse_args()
    chosen = ["conv"] + [f for f in args.forms.split(",") if f != "conv"]
    threads = tuple(int(t) for t in args.threads.split(","))
    for k, c, size, stride in CASES:
        ly = layer(c, c, k, size, stride=stride, group=c)
        models = {name: single(FORMS[name], ly) for name in chosen}
        check_and_compare(models, feeds_for(ly), threads=threads, repeats=args.repeats,
                          title=f"depthwise {k}x{k} C={c} @{size}x{size} stride {stride}")


if __name__ == "__main__":
    main()
