"""``im2col``: any conv as patch extraction plus one GEMM.

Matches every conv: static or dynamic spatial sizes, strides, dilations, pads, every
``auto_pad``, groups and depthwise. Emits: Transpose, [Pad], one strided Slice per kernel
offset, Concat, MatMul (2-D weight, or batched ``[g, K/g, M/g]`` when grouped), [Add],
Transpose.
"""

from __future__ import annotations

import numpy as np

from ..conv import ConvSpec
from ..emit import Emitter
from .patches import emit_patch_gemm

NAME = "im2col"


def applies(spec: ConvSpec) -> str | None:
    return None


def emit(spec: ConvSpec, weight: np.ndarray, bias: np.ndarray | None, em: Emitter) -> None:
    emit_patch_gemm(spec, weight, bias, em)
