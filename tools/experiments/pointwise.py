"""Pointwise experiment (issue 7, question 5): the fastest exact form of a 1x1 conv.

Forms, each checked against onnxruntime's Conv before timing:
  boundary      Transpose to channels-last, MatMul (weight B), Add, Transpose back: what
                ``lowering/patches.py`` emits today (onnxruntime turns MatMul + Add into Gemm)
  boundary_act  the same with the following Relu placed before the Transpose back
                (2-D rows: onnxruntime fuses Gemm + Relu into one FusedGemm)
  wleft         Reshape to [N, C, H*W], MatMul(W [M, C], x) (weight on the left), Add
  chain_*       two 1x1 convs with Relu, as in a bottleneck: Conv, the boundary form per
                conv (onnxruntime cancels the inner Transpose pair), and weight-left

Run: python tools/experiments/pointwise.py [--repeats 40]
"""

from __future__ import annotations

import argparse

from forms import (
    Builder,
    boundary,
    check_and_compare,
    conv_form,
    feeds_for,
    layer,
    nchw_wleft_form,
    nhwc_im2col_form,
)

CASES = ((64, 256, 56), (256, 64, 56), (1024, 256, 14), (512, 2048, 7), (32, 16, 112))


def relu_after(form, *layers, **kw):
    """Each layer through ``form`` followed by a Relu."""
    b = Builder()
    x = "X"
    for ly in layers:
        x = form(b, x, ly, act="Relu", **kw)
    return b.model([1, layers[0].c, layers[0].size, layers[0].size], x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    for c, m, size in CASES:
        ly = layer(c, m, 1, size)
        models = {"conv": relu_after(conv_form, ly),
                  "boundary": relu_after(boundary(nhwc_im2col_form), ly),
                  "boundary_act": relu_after(boundary(nhwc_im2col_form), ly, gemm2d=True),
                  "wleft": relu_after(nchw_wleft_form, ly)}
        check_and_compare(models, feeds_for(ly), repeats=args.repeats,
                          title=f"1x1 conv {c}->{m} @{size}x{size} + Relu")
    first, second = layer(256, 64, 1, 56, seed=1), layer(64, 256, 1, 56, seed=2)
    models = {"chain_conv": relu_after(conv_form, first, second),
              "chain_boundary": relu_after(boundary(nhwc_im2col_form), first, second),
              "chain_boundary_act": relu_after(boundary(nhwc_im2col_form), first, second,
                                               gemm2d=True),
              "chain_wleft": relu_after(nchw_wleft_form, first, second)}
    check_and_compare(models, feeds_for(first), repeats=args.repeats,
                      title="1x1 256->64 + Relu, 1x1 64->256 + Relu @56x56")


if __name__ == "__main__":
    main()
