"""``fc``: a conv whose kernel covers its whole (padded) input is a Linear layer.

Matches static spatial sizes with a 1x..x1 output and ``group == 1``. Emits: [Pad],
[Slice when dilation or slack leaves pixels untouched], Reshape to ``[N, C*k...]``,
MatMul with ``[C*k..., M]``, [Add], Reshape to ``[N, M, 1, ...]``. No Transposes.
"""

from __future__ import annotations

import numpy as np

from ..conv import ConvSpec
from ..emit import Emitter
from .dense import emit_flat
from .weights import flat_weight

NAME = "fc"


def applies(spec: ConvSpec) -> str | None:
    if not spec.is_static:
        return "spatial size is not static"
    if spec.group != 1:
        return f"grouped (group={spec.group})"
    if any(o != 1 for o in spec.output_spatial()):
        return "kernel does not cover the whole padded input"
    return None


def emit(spec: ConvSpec, weight: np.ndarray, bias: np.ndarray | None, em: Emitter) -> None:
    r = spec.rank
    x = spec.input
    if any(spec.pads):
        x = em.op("Pad", [x, em.ints("pads", [0, 0, *spec.pads[:r], 0, 0, *spec.pads[r:]])])
    padded = spec.padded_spatial()
    if padded != spec.spans or any(d != 1 for d in spec.dilations):
        x = em.op("Slice", [x, em.ints("starts", [0] * r), em.ints("ends", list(spec.spans)),
                            em.ints("axes", list(range(2, r + 2))),
                            em.ints("steps", spec.dilations)], "taps")
    emit_flat(spec, x, flat_weight(weight), bias, em)
