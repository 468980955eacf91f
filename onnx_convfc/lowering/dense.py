"""``dense``: the exact fully connected equivalent of a conv, for a fixed input shape.

Matches convs with static spatial sizes (every stride, dilation, pad, ``auto_pad``, group and
depthwise); the batch dim may stay dynamic. The caller also checks ``over_budget``, since the
matrix grows with the square of the feature-map size. Emits: Reshape to ``[N, C*prod(in)]``,
MatMul with the precomputed ``[C*prod(in), M*prod(out)]`` matrix, [Add of the bias repeated
per output position], Reshape to ``[N, M, out...]``. No Transposes, no Pad, no Slice.
"""

from __future__ import annotations

import math

import numpy as np

from ..conv import ConvSpec, GroupedGeometry
from ..emit import Emitter
from ..report import size_text
from .weights import dense_matrix

NAME = "dense"


def applies(spec: ConvSpec) -> str | None:
    if not spec.is_static:
        return "spatial size is not static"
    return None


def matrix_shape(spec: GroupedGeometry) -> tuple[int, int]:
    """``(C*prod(in), M*prod(out))`` of a static conv or ConvTranspose, in Python ints:
    declared dims can be large enough to overflow int64, and the budget check must see the
    true size."""
    return (spec.in_channels * math.prod(spec.input_spatial),
            spec.out_channels * math.prod(spec.output_spatial()))


def over_budget(spec: GroupedGeometry, itemsize: int, max_bytes: int) -> str | None:
    """The reason the matrix of a static conv or ConvTranspose is too large, or ``None`` when
    it fits."""
    return matrix_refusal(*matrix_shape(spec), itemsize, max_bytes)


def matrix_refusal(rows: int, cols: int, itemsize: int, max_bytes: int) -> str | None:
    """Why a ``[rows, cols]`` matrix of ``itemsize``-byte values is over ``max_bytes``."""
    size = rows * cols * itemsize
    if size <= max_bytes:
        return None
    return (f"matrix [{rows}, {cols}] needs {size_text(size)}, "
            f"over --max-dense-bytes {size_text(max_bytes)}")


def emit(spec: ConvSpec, weight: np.ndarray, bias: np.ndarray | None, em: Emitter) -> None:
    emit_flat(spec, spec.input, dense_matrix(weight, spec), bias, em)


def emit_flat(spec: GroupedGeometry, x: str, matrix: np.ndarray, bias: np.ndarray | None,
              em: Emitter) -> None:
    """The fully connected layer every dense form ends in (``fc``, ``dense``, ConvTranspose's
    ``dense``): ``x`` flattened to ``[N, K]``, times ``matrix``, plus the bias repeated per
    output position, reshaped to ``spec.output`` ``[N, M, out...]``."""
    out = spec.output_spatial()
    # [-1, K], not [0, -1]: Reshape cannot resolve -1 for an empty batch
    flat = em.op("Reshape", [x, em.ints("flat_shape", [-1, matrix.shape[0]])], "flatten")
    y = em.op("MatMul", [flat, em.const("weight", matrix)])
    if bias is not None:
        per_position = np.repeat(bias, int(np.prod(out)))
        y = em.op("Add", [y, em.const("bias", per_position)], "AddBias")
    em.op("Reshape", [y, em.ints("out_shape", [0, spec.out_channels, *out])], "unflatten",
          output=spec.output)
