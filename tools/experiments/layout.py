"""Layout experiment (issue 7, questions 1 and 2): where the Transposes go, and Gemm fusion.

Single 3x3 convs and chains of five 3x3 64-channel convs at 56x56 with an op between them,
each as onnxruntime's Conv and as lowered forms:
  boundary     Transpose, NHWC im2col (Pad, 9 Slices, Concat, MatMul, Add), Transpose per
               conv: what ``lowering/patches.py`` emits today
  nhwc_all     NHWC from the first conv to the last, Transposes only at the two ends
  nhwc_gemm    nhwc_all on 2-D rows (Reshape, MatMul, Add, Relu, Reshape): FusedGemm
  wleft        channels-first, weight on the left (``W @ patches``), no Transposes

Run: python tools/experiments/layout.py [--repeats 40]
"""

from __future__ import annotations

import argparse

import numpy as np
from forms import (
    NCHW_TO_NHWC,
    NHWC_TO_NCHW,
    Builder,
    boundary,
    check_and_compare,
    conv_form,
    feeds_for,
    layer,
    nchw_wleft_form,
    nhwc_im2col_form,
    single,
)

SHAPE = [1, 64, 56, 56]


def chain(form, between: str | None = "Relu", nhwc: bool = False, residual: bool = False,
          n: int = 5, **kw):
    """``n`` convs, each followed by ``between``: an activation op type, "BatchNormalization"
    (a per-channel Mul + Add when ``nhwc``), or "ScaleShift" (Mul + Add by constants); and by
    a residual Add when ``residual``."""
    b = Builder()
    x = b.op("Transpose", "X", perm=NCHW_TO_NHWC) if nhwc else "X"
    for i in range(n):
        ly = layer(64, 64, 3, 56, seed=i)
        if between in ("BatchNormalization", "ScaleShift"):
            y = form(b, x, ly, **kw)
            axis = (64,) if nhwc else (64, 1, 1)
            scale, shift = (b.const(np.full(axis, v, np.float32)) for v in (1.5, 0.1))
            y = b.op("BatchNormalization", y, *(b.const(np.full(64, v, np.float32))
                                                for v in (1.5, 0.1, 0.0, 1.0)), epsilon=0.0) \
                if between == "BatchNormalization" and not nhwc \
                else b.op("Add", b.op("Mul", y, scale), shift)
        else:
            y = form(b, x, ly, act=between, **kw)
        x = b.op("Add", y, x) if residual else y
    if nhwc:
        x = b.op("Transpose", x, perm=NHWC_TO_NCHW)
    return b.model(SHAPE, x)


def transpose_only() -> object:
    b = Builder()
    return b.model(SHAPE, b.op("Transpose", "X", perm=NCHW_TO_NHWC))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    r = args.repeats
    for c, size in ((64, 56), (256, 14)):
        ly = layer(c, c, 3, size)
        models = {"conv": single(conv_form, ly),
                  "boundary": single(boundary(nhwc_im2col_form), ly),
                  "boundary_gemm2d": single(boundary(nhwc_im2col_form), ly, gemm2d=True),
                  "wleft": single(nchw_wleft_form, ly)}
        if c == 64:
            models["one Transpose alone"] = transpose_only()
        check_and_compare(models, feeds_for(ly), repeats=r, unchecked=("one Transpose alone",),
                          title=f"single 3x3 conv {c}->{c} @{size}x{size}")
    feeds = feeds_for(layer(64, 64, 3, 56))
    im2col = nhwc_im2col_form
    for between, residual in (("Relu", False), ("Relu", True), ("BatchNormalization", False)):
        models = {"conv": chain(conv_form, between, residual=residual),
                  "boundary": chain(boundary(im2col), between, residual=residual),
                  "nhwc_all": chain(im2col, between, nhwc=True, residual=residual),
                  "nhwc_gemm": chain(im2col, between, nhwc=True, residual=residual, gemm2d=True),
                  "wleft": chain(nchw_wleft_form, between, residual=residual)}
        what = f"{between}{' + residual Add' if residual else ''}"
        check_and_compare(models, feeds, repeats=r,
                          title=f"chain of five 3x3 64->64 @56x56, {what} after each")


if __name__ == "__main__":
    main()
