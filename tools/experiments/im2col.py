"""im2col experiment (issue 7, question 4): the cheapest exact way to build the patch matrix.

Forms, each checked against onnxruntime's Conv before timing (Transposes at both ends where
the form is channels-last, as one lowered conv on its own needs):
  slices        Pad, one strided Slice per kernel offset, Concat, MatMul, Add: what
                ``lowering/patches.py`` emits today
  gather        Pad, Reshape to [N, pixels, C], one Gather with precomputed [L, taps]
                int64 indices (whole C-rows), Reshape, MatMul, Add
  gather_i32    the same with int32 indices (half the index bytes)
  wleft         channels-first Slices + Concat, weight on the left
  s2d_*         stride s > 1: Pad, SpaceToDepth(s), then a stride-1 conv with a ceil(k/s)
                kernel over s*s*C channels (exact; zero taps where the kernel ends);
                when k == s it is a pointwise conv, no patches at all; s2d_wleft runs
                it channels-first with the weight on the left, s2d_nhwc as ``gather``
                (or a plain MatMul when k == s) between Transposes

Run: python tools/experiments/im2col.py [--repeats 40]
"""

from __future__ import annotations

import argparse

import numpy as np
from forms import (
    boundary,
    check_and_compare,
    conv_form,
    feeds_for,
    layer,
    nchw_wleft_form,
    nhwc_gather_form,
    nhwc_im2col_form,
    s2d_form,
    single,
)

CASES = (  # c, m, k, size, stride, pad
    (64, 64, 3, 56, 1, 1), (128, 128, 3, 28, 1, 1), (256, 256, 3, 14, 1, 1),
    (64, 128, 3, 56, 2, 1), (3, 32, 3, 224, 2, 1), (3, 64, 7, 224, 2, 3),
    (3, 96, 4, 224, 4, 0), (64, 128, 2, 56, 2, 0),
)


def forms_for(ly) -> dict:
    models = {"conv": single(conv_form, ly),
              "slices": single(boundary(nhwc_im2col_form), ly),
              "gather": single(boundary(nhwc_gather_form), ly),
              "gather_i32": single(boundary(nhwc_gather_form), ly, index_dtype=np.int32),
              "wleft": single(nchw_wleft_form, ly)}
    if ly.stride > 1:
        models["s2d_wleft"] = single(s2d_form, ly)
        inner = nhwc_im2col_form if ly.k == ly.stride else nhwc_gather_form  # no taps if k == s
        models["s2d_nhwc"] = single(s2d_form, ly, inner=boundary(inner))
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    for c, m, k, size, stride, pad in CASES:
        ly = layer(c, m, k, size, stride=stride, pad=pad)
        check_and_compare(forms_for(ly), feeds_for(ly), repeats=args.repeats,
                          title=f"{k}x{k} conv {c}->{m} @{size}x{size} stride {stride} pad {pad}")


if __name__ == "__main__":
    main()
