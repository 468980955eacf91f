"""``im2col-integer``: ConvInteger as zero-point-padded patches and one MatMulInteger.

Matches every ConvInteger (any geometry, per-tensor or per-channel weight zero point,
constant or run-time operands). Emits: Transpose, [Pad with the input zero point], one
Slice per kernel offset, Concat, MatMulInteger (2-D weight, or batched ``[g, K/g, M/g]``
when grouped), Transpose. The int32 result is bit-exact.
"""

from __future__ import annotations

from ..emit import Emitter
from ..quantconv import QuantConvSpec
from .integer import emit_integer_gemm
from .operands import Operand, Operands
from .patches import to_channels_first
from .taps import slice_refusal

NAME = "im2col-integer"


def applies(spec: QuantConvSpec) -> str | None:
    return slice_refusal(spec.conv)


def emit(spec: QuantConvSpec, weight: Operand, bias: None, em: Emitter) -> None:
    acc, rows = emit_integer_gemm(spec, weight, em, Operands(em))
    to_channels_first(spec.conv, em, acc, rows)
