"""``pointwise``: a 1x1 (or 1, or 1x1x1) conv is one MatMul over channels-last pixels.

Matches kernels of all ones, any stride (a strided Slice picks the pixels), pads (a Pad),
and groups (a batched MatMul). Emits: Transpose, [Pad], [Slice], MatMul, [Add], Transpose.
"""

from __future__ import annotations

import numpy as np

from ..conv import ConvSpec
from ..emit import Emitter
from .patches import emit_patch_gemm

NAME = "pointwise"


def applies(spec: ConvSpec) -> str | None:
    if any(k != 1 for k in spec.kernel):
        return f"kernel {'x'.join(map(str, spec.kernel))} is not 1x1"
    return None


def emit(spec: ConvSpec, weight: np.ndarray, bias: np.ndarray | None, em: Emitter) -> None:
    emit_patch_gemm(spec, weight, bias, em)
