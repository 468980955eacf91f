"""Small-channel stems (issue 7): the fastest FC-form (weight as B) lowering when C < 16.

A C-row of 3 floats is too short for channels-last Slices or a Gather to copy efficiently.
Forms, each checked against onnxruntime's Conv before timing:
  slices        today's lowering: Transpose, Pad, strided Slices, Concat, MatMul, Transpose
  cf_rows       channels-first: Pad, strided Slices of [N, C, OH, OW], Concat on channels
                -> [N, taps*C, OH, OW], Reshape [N, K, L], Transpose to rows [N, L, K],
                MatMul with B = [K, M] (rows ordered (tap, channel), as ``patch_weight``),
                Add, Transpose back, Reshape
  cf_wleft      the same patches with the weight on the left (not FC form; the reference)
  s2d_cf_rows   stride s > 1: Pad, SpaceToDepth(s), then ``cf_rows`` of the stride-1 conv
                with a ceil(k/s) kernel over s*s*C channels; when k == s that is a pointwise
                conv (Reshape, Transpose, MatMul, Transpose)

Run: python tools/experiments/stem.py [--repeats 40] [--threads 1,2]
"""

from __future__ import annotations

import argparse

from forms import (
    Builder,
    Layer,
    _pad,
    _taps,
    _wleft_gemm,
    boundary,
    check_and_compare,
    conv_form,
    feeds_for,
    layer,
    nhwc_im2col_form,
    rows_tap_channel,
    s2d_form,
    single,
)

CASES = (  # c, m, k, size, stride, pad
    (3, 32, 3, 224, 2, 1), (3, 16, 3, 640, 2, 1), (3, 64, 7, 224, 2, 3), (3, 96, 4, 224, 4, 0),
    (8, 16, 3, 112, 1, 1),
)


def _cf_patches(b: Builder, x: str, ly: Layer) -> str:
    x = _pad(b, x, ly, nhwc=False)
    return _taps(b, x, ly, [2, 3], stack=1) if ly.k > 1 or ly.stride > 1 else x


def cf_rows(b: Builder, x: str, ly: Layer) -> str:
    matrix = rows_tap_channel(ly.weight)
    flat = b.op("Reshape", _cf_patches(b, x, ly), b.ints([0, matrix.shape[0], -1]))
    rows = b.op("Transpose", flat, perm=[0, 2, 1])
    y = b.op("MatMul", rows, b.const(matrix))
    if ly.bias is not None:
        y = b.op("Add", y, b.const(ly.bias))
    y = b.op("Transpose", y, perm=[0, 2, 1])
    return b.op("Reshape", y, b.ints([0, ly.m, ly.out, ly.out]))


def cf_wleft(b: Builder, x: str, ly: Layer) -> str:
    return _wleft_gemm(b, _cf_patches(b, x, ly), rows_tap_channel(ly.weight).T, ly)


FORMS = {"conv": conv_form, "slices": boundary(nhwc_im2col_form), "cf_rows": cf_rows,
         "cf_wleft": cf_wleft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", default="1", help="comma-separated thread counts")
    args = parser.parse_args()
    threads = tuple(int(t) for t in args.threads.split(","))
    for c, m, k, size, stride, pad in CASES:
        ly = layer(c, m, k, size, stride=stride, pad=pad)
        models = {name: single(form, ly) for name, form in FORMS.items()}
        if stride > 1:
            models["s2d_cf_rows"] = single(s2d_form, ly, inner=cf_rows)
        check_and_compare(models, feeds_for(ly), threads=threads, repeats=args.repeats,
                          title=f"{k}x{k} conv {c}->{m} @{size}x{size} stride {stride} pad {pad}")


if __name__ == "__main__":
    main()
