"""``im2col``: any conv as patch extraction plus one GEMM.

Matches every conv: static or dynamic spatial sizes, strides, dilations, pads, every
``auto_pad``, groups and depthwise; only a kernel of over ``taps.MAX_SLICE_TAPS`` taps needs
static sizes. Emits: the patch rows (a Gather of channels-last rows
for static sizes, channels-first or channels-last strided Slices + Concat otherwise; see
``patches.py``), MatMul (2-D weight, or batched ``[g, K/g, M/g]`` when grouped), [Add],
Transpose.
"""

from __future__ import annotations

import numpy as np

from ..conv import ConvSpec
from ..emit import Emitter
from .patches import emit_patch_gemm
from .taps import slice_refusal

NAME = "im2col"


def applies(spec: ConvSpec) -> str | None:
    return slice_refusal(spec)


def emit(spec: ConvSpec, weight: np.ndarray, bias: np.ndarray | None, em: Emitter) -> None:
    emit_patch_gemm(spec, weight, bias, em)
