"""The ops of the conv family that get lowered, and how each one is read.

One ``Family`` per ONNX op: where its weight, bias and quantization operands sit among the
node's inputs, how its geometry is normalised into a spec, and which lowerings take it.
``rewrite`` reads operands and builds specs through this table only, so adding an op is one
entry here plus its lowering modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import ModuleType

from onnx import NodeProto

from .conv import conv_spec
from .convtranspose import conv_transpose_spec
from .graphs import STANDARD_DOMAINS, Shape
from .lowering import (
    AUTO_ORDER,
    CONV_INTEGER_LOWERINGS,
    CONV_TRANSPOSE_LOWERINGS,
    LOWERINGS,
    QLINEAR_CONV_LOWERINGS,
)
from .quantconv import conv_integer_spec, qlinear_conv_spec

# (node, name, weight shape, input shape or None, quantization operands) -> spec
SpecBuilder = Callable[[NodeProto, str, tuple, "Shape | None", dict], object]


@dataclass(frozen=True)
class Family:
    """How to read and lower one op type.

    ``params`` names the quantization operands and their input indices. ``runtime`` lists
    the lowerings that accept operands computed at run time (a weight the graph produces is
    reshaped by emitted nodes instead of in numpy). ``float_weights``: the weight dtype must
    be one onnxruntime's CPU MatMul runs (``plan.dtype_refusal``).
    """

    op_type: str
    weight: int
    bias: int | None
    params: tuple[tuple[str, int], ...]
    required: int
    build: SpecBuilder
    lowerings: Mapping[str, ModuleType]
    auto_order: tuple[str, ...]
    runtime: tuple[str, ...]
    float_weights: bool

    def roles(self) -> list[tuple[str, int]]:
        """Every operand but the data input: (role, input index)."""
        found = [("weight", self.weight)] + list(self.params)
        if self.bias is not None:
            found.append(("bias", self.bias))
        return found

    def tables(self, runtime: bool) -> tuple[Mapping[str, ModuleType], tuple[str, ...]]:
        """The lowerings on offer and the auto order, restricted when operands are run-time."""
        if not runtime:
            return self.lowerings, self.auto_order
        return ({n: m for n, m in self.lowerings.items() if n in self.runtime},
                tuple(n for n in self.auto_order if n in self.runtime))


def _named(build: Callable) -> SpecBuilder:
    def named(node, name, weight_shape, input_shape, params):
        return replace(build(node, weight_shape, input_shape), name=name)
    return named


def _named_quant(build: Callable) -> SpecBuilder:
    def named(node, name, weight_shape, input_shape, params):
        spec = build(node, weight_shape, input_shape, params)
        return replace(spec, conv=replace(spec.conv, name=name))
    return named


FAMILIES: dict[str, Family] = {f.op_type: f for f in (
    Family("Conv", weight=1, bias=2, params=(), required=2, build=_named(conv_spec),
           lowerings=LOWERINGS, auto_order=AUTO_ORDER, runtime=("pointwise", "im2col"),
           float_weights=True),
    Family("ConvTranspose", weight=1, bias=2, params=(), required=2,
           build=_named(conv_transpose_spec), lowerings=CONV_TRANSPOSE_LOWERINGS,
           auto_order=("subpixel",), runtime=("subpixel",), float_weights=True),
    Family("ConvInteger", weight=1, bias=None,
           params=(("x_zero_point", 2), ("w_zero_point", 3)), required=2,
           build=_named_quant(conv_integer_spec), lowerings=CONV_INTEGER_LOWERINGS,
           auto_order=tuple(CONV_INTEGER_LOWERINGS), runtime=tuple(CONV_INTEGER_LOWERINGS),
           float_weights=False),
    Family("QLinearConv", weight=3, bias=8,
           params=(("x_scale", 1), ("x_zero_point", 2), ("w_scale", 4), ("w_zero_point", 5),
                   ("y_scale", 6), ("y_zero_point", 7)), required=8,
           build=_named_quant(qlinear_conv_spec), lowerings=QLINEAR_CONV_LOWERINGS,
           auto_order=tuple(QLINEAR_CONV_LOWERINGS), runtime=tuple(QLINEAR_CONV_LOWERINGS),
           float_weights=False),
)}


def is_conv(node: NodeProto) -> bool:
    """An op of the conv family: Conv, ConvTranspose, ConvInteger, QLinearConv."""
    return node.op_type in FAMILIES and node.domain in STANDARD_DOMAINS
