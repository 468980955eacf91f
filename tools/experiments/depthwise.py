"""Depthwise experiment (issue 7, question 3): which exact form of a 3x3 depthwise conv is fastest.

Forms, each checked against onnxruntime's Conv (group = C) before timing:
  batched_matmul   what ``lowering/patches.py`` emits for groups: Reshape to groups,
                   Transpose, Pad, 9 Slices, Concat, MatMul [N,g,L,9] @ [g,9,1], Add,
                   Transpose, Reshape
  nchw_reducesum   Pad, 9 Slices stacked on a new axis, Mul by [C,9,1,1], ReduceSum
  nhwc_reducesum   the same channels-last (Transposes at both ends)
  nchw_shift_add   Pad, 9 Slices, each times a per-channel scale, summed by an Add chain
  nhwc_shift_add   the same channels-last (Transposes at both ends)
  nchw_banded      k row Slices + Concat, batched MatMul with a banded [C, k*Wp, OW] matrix

Run: python tools/experiments/depthwise.py [--repeats 40]
"""

from __future__ import annotations

import argparse

import numpy as np
from forms import (
    Builder,
    Layer,
    boundary,
    check_and_compare,
    conv_form,
    feeds_for,
    layer,
    single,
)


def _window_slices(b: Builder, x: str, ly: Layer, axes: list[int]) -> list[str]:
    span = (ly.out - 1) * ly.stride + 1
    axes_c, steps = b.ints(axes), b.ints([ly.stride] * 2)
    return [b.op("Slice", x, b.ints([i, j]), b.ints([i + span, j + span]), axes_c, steps)
            for i in range(ly.k) for j in range(ly.k)]


def _pad(b: Builder, x: str, ly: Layer, spatial: tuple[int, int], rank: int) -> str:
    begins = [0] * rank
    for a in spatial:
        begins[a] = ly.pad
    return b.op("Pad", x, b.ints(begins + begins))


def batched_matmul(b: Builder, x: str, ly: Layer) -> str:
    c, taps = ly.c, ly.k * ly.k
    x = b.op("Reshape", x, b.ints([0, c, 1, ly.size, ly.size]))
    x = b.op("Transpose", x, perm=[0, 1, 3, 4, 2])
    x = _pad(b, x, ly, (2, 3), 5)
    patches = b.op("Concat", *_window_slices(b, x, ly, [2, 3]), axis=-1)
    flat = b.op("Reshape", patches, b.ints([0, 0, -1, taps]))
    y = b.op("MatMul", flat, b.const(ly.weight.reshape(c, taps, 1)))
    if ly.bias is not None:
        y = b.op("Add", y, b.const(ly.bias.reshape(c, 1, 1)))
    y = b.op("Transpose", y, perm=[0, 1, 3, 2])
    return b.op("Reshape", y, b.ints([0, c, ly.out, ly.out]))


def nchw_reducesum(b: Builder, x: str, ly: Layer) -> str:
    x = b.op("Reshape", _pad(b, x, ly, (2, 3), 4), b.ints([0, ly.c, 1, -1, ly.size + 2 * ly.pad]))
    stacked = b.op("Concat", *_window_slices(b, x, ly, [3, 4]), axis=2)  # [N, C, 9, OH, OW]
    y = b.op("Mul", stacked, b.const(ly.weight.reshape(ly.c, -1, 1, 1)))
    y = b.op("ReduceSum", y, b.ints([2]), keepdims=0)
    return b.op("Add", y, b.const(ly.bias.reshape(-1, 1, 1)))


def nhwc_reducesum(b: Builder, x: str, ly: Layer) -> str:
    x = _pad(b, x, ly, (1, 2), 4)
    x = b.op("Unsqueeze", x, b.ints([3]))  # [N, Hp, Wp, 1, C]
    stacked = b.op("Concat", *_window_slices(b, x, ly, [1, 2]), axis=3)  # [N, OH, OW, 9, C]
    y = b.op("Mul", stacked, b.const(ly.weight.reshape(ly.c, -1).T.copy()))
    y = b.op("ReduceSum", y, b.ints([3]), keepdims=0)
    return b.op("Add", y, b.const(ly.bias))


def _shift_add(b: Builder, x: str, ly: Layer, nhwc: bool) -> str:
    spatial = (1, 2) if nhwc else (2, 3)
    x = _pad(b, x, ly, spatial, 4)
    scales = ly.weight.reshape(ly.c, -1).T  # [taps, C]
    acc = None
    for tap, piece in enumerate(_window_slices(b, x, ly, list(spatial))):
        scale = scales[tap] if nhwc else scales[tap].reshape(-1, 1, 1)
        term = b.op("Mul", piece, b.const(scale.copy()))
        acc = term if acc is None else b.op("Add", acc, term)
    return b.op("Add", acc, b.const(ly.bias if nhwc else ly.bias.reshape(-1, 1, 1)))


def nchw_shift_add(b: Builder, x: str, ly: Layer) -> str:
    return _shift_add(b, x, ly, nhwc=False)


def nhwc_shift_add(b: Builder, x: str, ly: Layer) -> str:
    return _shift_add(b, x, ly, nhwc=True)


def nchw_banded(b: Builder, x: str, ly: Layer) -> str:
    """k row Slices concatenated along W, one batched MatMul with a per-channel banded matrix.

    ``[N, C, OH, k*Wp] @ [C, k*Wp, OW]``: W-direction taps and stride live in the matrix, so
    the output comes out channels-first with no reshuffle (weight grows to C*k*Wp*OW).
    """
    k, s, side = ly.k, ly.stride, ly.size + 2 * ly.pad
    x = _pad(b, x, ly, (2, 3), 4)
    span = (ly.out - 1) * s + 1
    rows = [b.op("Slice", x, b.ints([kh]), b.ints([kh + span]), b.ints([2]), b.ints([s]))
            for kh in range(k)]
    band = np.zeros((ly.c, k, side, ly.out), np.float32)
    j = np.arange(ly.out)
    for kh in range(k):
        for kw in range(k):
            band[:, kh, j * s + kw, j] = ly.weight[:, 0, kh, kw][:, None]
    y = b.op("MatMul", b.op("Concat", *rows, axis=-1), b.const(band.reshape(ly.c, -1, ly.out)))
    return b.op("Add", y, b.const(ly.bias.reshape(-1, 1, 1)))


FORMS = {"conv": conv_form, "batched_matmul": batched_matmul,
         "nchw_reducesum": nchw_reducesum, "nhwc_reducesum": boundary(nhwc_reducesum),
         "nchw_shift_add": nchw_shift_add, "nhwc_shift_add": boundary(nhwc_shift_add),
         "nchw_banded": nchw_banded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    for c, size, stride in ((32, 112, 1), (64, 56, 1), (128, 56, 2), (128, 28, 1),
                            (256, 14, 1), (480, 10, 1)):
        ly = layer(c, c, 3, size, stride=stride, group=c)
        models = {name: single(form, ly) for name, form in FORMS.items()}
        check_and_compare(models, feeds_for(ly), repeats=args.repeats,
                          title=f"depthwise 3x3 C={c} @{size}x{size} stride {stride}")


if __name__ == "__main__":
    main()
