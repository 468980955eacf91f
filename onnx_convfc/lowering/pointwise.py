"""``pointwise``: a 1x1 (or 1, or 1x1x1) conv is one MatMul over channels-last pixels.

Matches kernels of all ones, any stride (a strided Slice picks the pixels), pads (a Pad),
and groups (a batched MatMul). Emits: Transpose, [Pad], [Slice], MatMul, [Add], Transpose.

With ``--weight-left``, a group 1 conv without stride or pads over static pixels is
``W @ X`` on ``[N, C, pixels]`` instead (Reshape, MatMul, [Add], Reshape, no Transposes)
where it was measured faster (1 thread, ``docs/performance.md``): over at least
``WEIGHT_LEFT_PIXELS`` pixels (256->64 @56x56 0.98-1.07x the Conv vs 1.16-1.20x in FC form,
64->256 @56x56 1.18-1.29x vs 1.41-1.53x), or with at most ``WEIGHT_LEFT_CHANNELS`` channels
in and out, where the Transposes cost more than the small GEMM they feed (PP-OCR cls with
only its 1x1 convs rewritten: 1.15x -> 1.06x the original). Wide convs over few pixels stay
in FC form (1024->256 @14x14: 1.14x vs 1.20x).
"""

from __future__ import annotations

import numpy as np

from ..conv import ConvSpec
from ..emit import Emitter
from .operands import Operand, is_runtime
from .patches import emit_patch_gemm, weight_left_gemm

NAME = "pointwise"
WEIGHT_LEFT_PIXELS = 28 * 28
WEIGHT_LEFT_CHANNELS = 256


def applies(spec: ConvSpec) -> str | None:
    if any(k != 1 for k in spec.kernel):
        return f"kernel {'x'.join(map(str, spec.kernel))} is not 1x1"
    return None


def emit(spec: ConvSpec, weight: Operand, bias: Operand | None, em: Emitter) -> None:
    if em.options.weight_left and takes_weight_left(spec) and not is_runtime(weight):
        c, m = spec.in_channels, spec.out_channels
        weight_left_gemm(spec, em, spec.input, weight.reshape(m, c), bias)
    else:
        emit_patch_gemm(spec, weight, bias, em)


def takes_weight_left(spec: ConvSpec) -> bool:
    """Group 1, no stride, no pads, static pixels: at least ``WEIGHT_LEFT_PIXELS`` of them or
    at most ``WEIGHT_LEFT_CHANNELS`` channels in and out."""
    return (spec.group == 1 and set(spec.strides) == {1} and spec.is_static
            and not any(spec.pads)
            and (int(np.prod(spec.input_spatial)) >= WEIGHT_LEFT_PIXELS
                 or max(spec.in_channels, spec.out_channels) <= WEIGHT_LEFT_CHANNELS))
