"""``pointwise``: a 1x1 (or 1, or 1x1x1) conv is one MatMul over channels-last pixels.

Matches kernels of all ones, any stride (a strided Slice picks the pixels), pads (a Pad),
and groups (a batched MatMul). Emits: Transpose, [Pad], [Slice], MatMul, [Add], Transpose.

With ``--weight-left``, a group 1 conv without stride or pads over at least
``WEIGHT_LEFT_PIXELS`` static pixels is ``W @ X`` on ``[N, C, pixels]`` instead: Reshape,
MatMul, [Add], Reshape, no Transposes. Measured (1 thread, ``docs/performance.md``):
256->64 @56x56 0.98-1.07x the Conv vs 1.16-1.20x in FC form, 64->256 @56x56 1.18-1.29x vs
1.41-1.53x; at 14x14 and below FC form wins (1024->256: 1.14x vs 1.20x), so it stays there.
"""

from __future__ import annotations

import numpy as np

from ..conv import ConvSpec
from ..emit import Emitter
from .operands import Operand, Operands, is_runtime
from .patches import emit_patch_gemm

NAME = "pointwise"
WEIGHT_LEFT_PIXELS = 28 * 28
WEIGHT_LEFT_NODE = "weight_left_MatMul"  # the one MatMul whose constant weight is A


def applies(spec: ConvSpec) -> str | None:
    if any(k != 1 for k in spec.kernel):
        return f"kernel {'x'.join(map(str, spec.kernel))} is not 1x1"
    return None


def emit(spec: ConvSpec, weight: Operand, bias: Operand | None, em: Emitter) -> None:
    if em.options.weight_left and takes_weight_left(spec) and not is_runtime(weight):
        _weight_left_form(spec, weight, bias, em)
    else:
        emit_patch_gemm(spec, weight, bias, em)


def takes_weight_left(spec: ConvSpec) -> bool:
    """Group 1, no stride, no pads, and at least ``WEIGHT_LEFT_PIXELS`` static pixels."""
    pixels = spec.input_spatial
    return (spec.group == 1 and set(spec.strides) == {1} and None not in pixels
            and spec.pads is not None and not any(spec.pads)
            and int(np.prod(pixels)) >= WEIGHT_LEFT_PIXELS)


def _weight_left_form(spec: ConvSpec, weight: np.ndarray, bias: Operand | None,
                      em: Emitter) -> None:
    """``[M, C] @ [N, C, pixels]``: the output comes out channels-first."""
    c, m = spec.in_channels, spec.out_channels
    pixels = int(np.prod(spec.input_spatial))
    x = em.op("Reshape", [spec.input, em.ints("pixels_shape", [0, c, pixels])],
              "flatten_pixels")
    y = em.op("MatMul", [em.const("weight", weight.reshape(m, c)), x], WEIGHT_LEFT_NODE)
    if bias is not None:
        ops = Operands(em)
        y = em.op("Add", [y, ops.name(ops.reshape(bias, (m, 1), "bias_column"), "bias")],
                  "AddBias")
    em.op("Reshape", [y, em.ints("out_shape", [0, m, *spec.input_spatial])], "unflatten",
          output=spec.output)
