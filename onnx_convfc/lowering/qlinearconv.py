"""``im2col-requant``: QLinearConv as MatMulInteger, int32 bias and a requantization.

The int32 sum of ``integer.emit_integer_gemm`` plus the int32 bias is converted to float,
multiplied by ``x_scale * w_scale / y_scale`` (computed in float32 in that order, once per
output channel, as onnxruntime does) and quantized by ``QuantizeLinear`` with scale 1 and
the output zero point: round half to even, then saturate, as the QLinearConv spec says.
Emits: the integer GEMM, [Add bias], Cast, Mul, QuantizeLinear, Transpose.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..emit import Emitter
from ..quantconv import QuantConvSpec
from .integer import emit_integer_gemm, per_column
from .operands import Operand, Operands
from .patches import to_channels_first
from .taps import slice_refusal

NAME = "im2col-requant"


def applies(spec: QuantConvSpec) -> str | None:
    return slice_refusal(spec.conv)


def emit(spec: QuantConvSpec, weight: Operand, bias: Operand | None, em: Emitter) -> None:
    ops = Operands(em)
    acc, rows = emit_integer_gemm(spec, weight, em, ops)
    if bias is not None:
        acc = em.op("Add", [acc, per_column(ops, bias, spec, "bias")], "AddBias")
    y = em.op("Cast", [acc], "to_float", to=TensorProto.FLOAT)
    scale = ops.binary("Div", ops.binary("Mul", spec.x_scale, spec.w_scale, "scale_xw"),
                       spec.y_scale, "requant_scale")
    y = em.op("Mul", [y, per_column(ops, scale, spec, "requant_scale")], "requantize")
    y_zp = ops.name(ops.reshape(spec.y_zero_point, (), "y_zero_point_scalar"), "y_zero_point")
    y = em.op("QuantizeLinear", [y, em.const("unit_scale", np.array(1.0, np.float32)), y_zp],
              "round_saturate")
    to_channels_first(spec.conv, em, y, rows)
