"""Network-block experiment (issue 7): what the per-op findings add up to in real blocks.

Three ResNet-50 bottlenecks (256 -> 64 -> 64 -> 256 channels at 56x56, BatchNormalization
after every conv, residual Add, Relu) and three MobileNetV2 inverted residuals (32 -> 192,
3x3 depthwise, 192 -> 32 at 28x28, Clip 0..6). Variants, each checked against the Conv model:
  conv          onnxruntime's Conv (it folds the BatchNormalization into the Conv itself)
  today         the lowering as emitted today: Transposes around every conv, im2col by
                Slices + Concat, BatchNormalization left after the MatMul
  bn_folded     today's form with the BatchNormalization folded into the lowered weights
  nhwc_slices   BN folded, channels-last from the first conv to the last (one Transpose at
                each end; residual Adds and activations run channels-last)
  nhwc_gather   nhwc_slices with im2col by one Gather, activation fused into Gemm
  dw_as_conv    (MobileNet) nhwc_gather for the pointwise convs, depthwise left as Conv

Run: python tools/experiments/blocks.py [--repeats 40]
"""

from __future__ import annotations

import argparse

import numpy as np
from depthwise import batched_matmul, nhwc_shift_add
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
    nhwc_gather_form,
    nhwc_im2col_form,
)
from forms import _act as apply_act

EPS = 1e-5


def bn_params(m: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    scale, shift = rng.uniform(0.5, 1.5, m), rng.normal(0, 0.1, m)
    mean, var = rng.normal(0, 0.1, m), rng.uniform(0.5, 1.5, m)
    return [a.astype(np.float32) for a in (scale, shift, mean, var)]


def folded(ly: Layer, bn: list[np.ndarray]) -> Layer:
    scale, shift, mean, var = bn
    factor = scale / np.sqrt(var + EPS)
    weight = ly.weight * factor[:, None, None, None]
    return Layer(weight.astype(np.float32), (shift - mean * factor).astype(np.float32),
                 ly.size, ly.stride, ly.pad, ly.group)


class Net:
    """Builds one variant: ``unit`` adds conv + BN + activation the variant's way."""

    def __init__(self, variant: str, depthwise) -> None:
        self.variant, self.depthwise = variant, depthwise
        self.nhwc = variant in ("nhwc_slices", "nhwc_gather", "dw_as_conv")
        self.b = Builder()

    def unit(self, x: str, ly: Layer, bn: list[np.ndarray], act: str | None) -> str:
        b, v = self.b, self.variant
        if v in ("conv", "today"):
            bare = Layer(ly.weight, None, ly.size, ly.stride, ly.pad, ly.group)
            if v == "conv":
                y = conv_form(b, x, bare)
            elif ly.group > 1:
                y = batched_matmul(b, x, bare)
            else:
                y = boundary(nhwc_im2col_form)(b, x, bare)
            y = b.op("BatchNormalization", y, *(b.const(p) for p in bn), epsilon=EPS)
            return self.act(y, act)
        ly = folded(ly, bn)
        if ly.group > 1:
            if v == "dw_as_conv":
                y = b.op("Transpose", x, perm=NHWC_TO_NCHW)
                y = b.op("Transpose", conv_form(b, y, ly), perm=NCHW_TO_NHWC)
            elif self.nhwc:
                y = self.depthwise(b, x, ly)
            else:
                y = batched_matmul(b, x, ly)
            return self.act(y, act)
        if v == "bn_folded":
            return self.act(boundary(nhwc_im2col_form)(b, x, ly), act)
        gather = v in ("nhwc_gather", "dw_as_conv") and ly.k > 1
        return (nhwc_gather_form if gather else nhwc_im2col_form)(
            b, x, ly, act=act, gemm2d=v != "nhwc_slices")

    def act(self, y: str, act: str | None) -> str:
        return apply_act(self.b, y, act)

    def begin(self) -> str:
        return self.b.op("Transpose", "X", perm=NCHW_TO_NHWC) if self.nhwc else "X"

    def end(self, x: str, shape) -> object:
        out = self.b.op("Transpose", x, perm=NHWC_TO_NCHW) if self.nhwc else x
        return self.b.model(shape, out)


def bottlenecks(variant: str, blocks: int = 3) -> object:
    net = Net(variant, None)
    x = net.begin()
    for i in range(blocks):
        y = x
        for j, (c, m, k) in enumerate(((256, 64, 1), (64, 64, 3), (64, 256, 1))):
            seed = 10 * i + j
            y = net.unit(y, layer(c, m, k, 56, seed=seed), bn_params(m, seed),
                         "Relu" if j < 2 else None)
        x = net.b.op("Relu", net.b.op("Add", y, x))
    return net.end(x, [1, 256, 56, 56])


def inverted_residuals(variant: str, blocks: int = 3) -> object:
    net = Net(variant, nhwc_shift_add)
    x = net.begin()
    for i in range(blocks):
        y = x
        for j, (c, m, k, g) in enumerate(((32, 192, 1, 1), (192, 192, 3, 192),
                                          (192, 32, 1, 1))):
            seed = 10 * i + j
            y = net.unit(y, layer(c, m, k, 28, group=g, seed=seed), bn_params(m, seed),
                         "Clip" if j < 2 else None)
        x = net.b.op("Add", y, x)
    return net.end(x, [1, 32, 28, 28])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    variants = ("conv", "today", "bn_folded", "nhwc_slices", "nhwc_gather")
    check_and_compare({v: bottlenecks(v) for v in variants}, feeds_for(layer(256, 64, 1, 56)),
                      repeats=args.repeats, title="three ResNet-50 bottlenecks @56x56")
    check_and_compare({v: inverted_residuals(v) for v in variants + ("dw_as_conv",)},
                      feeds_for(layer(32, 32, 1, 28)), repeats=args.repeats,
                      title="three MobileNetV2 inverted residuals @28x28")


if __name__ == "__main__":
    main()
