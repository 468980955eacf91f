"""``ConvInteger`` and ``QLinearConv``: a conv's geometry plus its quantization operands.

Both carry the attributes of ``Conv``, so the geometry is a ``ConvSpec``. What they add are
zero points (and, for QLinearConv, scales), each a constant array or a ``Runtime`` tensor.
Per-tensor operands hold one element; the weight's may hold one per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from .conv import ConvSpec, SpecError, conv_spec
from .lowering.operands import Operand, shape_of

INT8_TYPES = (np.dtype(np.int8), np.dtype(np.uint8))


@dataclass(frozen=True, eq=False)
class QuantConvSpec:
    """A ConvInteger or QLinearConv: ``conv`` geometry and the operands of its arithmetic.

    ``y = saturate(round((sum (x - x_zp) * (w - w_zp) + bias) * x_scale * w_scale / y_scale)
    + y_zp)``; ConvInteger stops at the integer sum and has no scales.
    """

    conv: ConvSpec
    x_zero_point: Operand | None
    w_zero_point: Operand | None
    x_scale: Operand | None = None
    w_scale: Operand | None = None
    y_scale: Operand | None = None
    y_zero_point: Operand | None = None

    @property
    def name(self) -> str:
        return self.conv.name

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @property
    def input_spatial(self) -> tuple[int | None, ...]:
        return self.conv.input_spatial

    @property
    def per_channel(self) -> bool:
        return any(v is not None and _size(v) > 1 for v in (self.w_zero_point, self.w_scale))

    def short(self) -> str:
        return self.conv.short() + (" per-channel" if self.per_channel else "")


def conv_integer_spec(node: NodeProto, weight_shape: tuple[int, ...],
                      input_shape: tuple[int | None, ...] | None,
                      operands: dict[str, Operand | None]) -> QuantConvSpec:
    """ConvInteger(x, w, [x_zero_point], [w_zero_point]).

    Raises:
        SpecError: when attributes or operand shapes are invalid.
    """
    conv = conv_spec(node, weight_shape, input_shape, bias_index=None)
    spec = QuantConvSpec(conv, operands.get("x_zero_point"), operands.get("w_zero_point"))
    _check(spec, operands)
    return spec


def qlinear_conv_spec(node: NodeProto, weight_shape: tuple[int, ...],
                      input_shape: tuple[int | None, ...] | None,
                      operands: dict[str, Operand | None]) -> QuantConvSpec:
    """QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, [B]).

    Raises:
        SpecError: when attributes or operand shapes are invalid.
    """
    conv = conv_spec(node, weight_shape, input_shape, weight_index=3, bias_index=8)
    spec = QuantConvSpec(conv, operands["x_zero_point"], operands["w_zero_point"],
                         operands["x_scale"], operands["w_scale"], operands["y_scale"],
                         operands["y_zero_point"])
    _check(spec, operands)
    return spec


def _check(spec: QuantConvSpec, operands: dict[str, Operand | None]) -> None:
    m = spec.conv.out_channels
    for role, value in operands.items():
        if value is None:
            continue
        size = _size(value)
        per_channel_ok = role.startswith("w_") and size == m
        if size != 1 and not per_channel_ok:
            allowed = f"1 or {m} elements" if role.startswith("w_") else "1 element"
            raise SpecError(f"{role} has shape {list(shape_of(value))}, expected {allowed}")
        if role.endswith("zero_point") and isinstance(value, np.ndarray) \
                and value.dtype not in INT8_TYPES:
            raise SpecError(f"{role} has dtype {value.dtype}, expected int8 or uint8")


def _size(value: Operand) -> int:
    return int(np.prod(shape_of(value), dtype=np.int64))
