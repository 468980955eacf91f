"""``dense`` for ConvTranspose: the exact fully connected layer of a fixed input shape.

A transposed conv is the adjoint of the ordinary conv that maps its output space back to
its input space with the same weight, strides, dilations and begin pads, so its matrix is
that conv's dense matrix transposed (``weights.dense_matrix``, shared with Conv's ``dense``).
Matches static spatial sizes; the batch may stay dynamic. Emits: Reshape to
``[N, C*prod(in)]``, MatMul with the ``[C*prod(in), M*prod(out)]`` matrix, [Add of the bias
repeated per output position], Reshape to ``[N, M, out...]``.
"""

from __future__ import annotations

import numpy as np

from ..conv import ConvSpec
from ..convtranspose import ConvTransposeSpec
from ..emit import Emitter
from .dense import emit_flat, over_budget  # noqa: F401 - over_budget: families.py's hook
from .weights import dense_matrix

NAME = "dense"


def applies(spec: ConvTransposeSpec) -> str | None:
    if not spec.is_static:
        return "spatial size is not static"
    return None


def adjoint(spec: ConvTransposeSpec) -> ConvSpec:
    """The conv from the output space ``[M, out...]`` to the input space ``[C, in...]``.

    Its end pads make its output exactly the input size; they are negative when
    ``output_padding`` or a large ``output_shape`` adds positions the kernel never reaches.
    """
    r = spec.rank
    out = spec.output_spatial()
    ends = tuple((size - 1) * s + span - o - spec.pads[i] for i, (size, s, span, o) in
                 enumerate(zip(spec.input_spatial, spec.strides, spec.spans, out)))
    return ConvSpec(
        name=spec.name, input=spec.output, weight=spec.weight, bias=None, output=spec.input,
        in_channels=spec.out_channels, out_channels=spec.in_channels, group=spec.group,
        kernel=spec.kernel, strides=spec.strides, dilations=spec.dilations,
        pads=spec.pads[:r] + ends, auto_pad="NOTSET", input_spatial=out)


def matrix(weight: np.ndarray, spec: ConvTransposeSpec) -> np.ndarray:
    """The ``[C*prod(in), M*prod(out)]`` matrix: the adjoint conv's, transposed."""
    return np.ascontiguousarray(dense_matrix(weight, adjoint(spec)).T)


def emit(spec: ConvTransposeSpec, weight: np.ndarray, bias: np.ndarray | None,
         em: Emitter) -> None:
    emit_flat(spec, spec.input, matrix(weight, spec), bias, em)
