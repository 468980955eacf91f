"""An inference BatchNormalization after a lowered conv: folded into it, or made Mul + Add.

onnxruntime folds a BatchNormalization into the Conv before it, not into the MatMul that conv
is lowered to. Left alone, the BN costs a pass over its tensor and, being a channels-first
op, stops onnxruntime cancelling the Transposes of consecutive lowered convs (Relu, Clip and
Mul/Add by a constant do not stop it). So, per ``RewriteOptions.batchnorm``:

- ``fold`` (default): when the BN alone reads the conv's output (not a graph output either),
  its per-channel scale and shift go into the conv's weight and bias before lowering; the
  lowered conv writes the BN's output and the BN goes. The conv's own output name disappears
  (nothing read it; per-node parity compares the BN's output instead) and the report says so.
  Any other BN after a lowered conv is made ``affine``.
- ``affine``: the BN becomes ``Mul`` and ``Add`` by ``[C, 1, ..., 1]`` constants, writing the
  BN's output: every tensor name stays.
- ``keep``: BNs are left as they are.

Measured (onnxruntime 1.32, 1 thread, light_resnet50 / inception_v2 / densenet121 with
random weights, interleaved medians): BNs kept 1.27 / 1.28 / 1.34 x the original, affine
1.20 / 1.30 / 1.38, fold 1.15 / 1.25 / 1.33; Transposes left by onnxruntime's optimiser
101 / 110 / 237, 3 / 5 / 121, 2 / 5 / 121 (densenet's other BNs follow a Concat, not a conv).
Fold is fastest, hence the default.

A BN matches when it is in inference mode (one output, ``training_mode`` 0) with constant
``[C]`` parameters; ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``
are computed in float64, then cast to the conv's dtype (and refused if that overflows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, helper

from .emit import Emitter
from .graphs import STANDARD_DOMAINS


@dataclass(frozen=True)
class Affine:
    """An inference BatchNormalization as ``y = x * scale + shift`` per channel (float64)."""

    node: NodeProto
    scale: np.ndarray
    shift: np.ndarray

    @property
    def channels(self) -> int:
        return len(self.scale)

    @property
    def label(self) -> str:
        return self.node.name or self.node.output[0]


def is_batchnorm(node: NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in STANDARD_DOMAINS


def as_affine(node: NodeProto, constant: Callable[[str], np.ndarray | None],
              dtype: np.dtype) -> Affine | None:
    """The BN's per-channel affine form, or ``None`` where it is no inference BN with constant
    ``[C]`` parameters whose scale and shift fit ``dtype``. ``constant(name)`` gives the
    array of a constant tensor, ``None`` for a computed one."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if len(node.input) != 5 or [o for o in node.output if o] != [node.output[0]] \
            or attrs.get("training_mode", 0) != 0:
        return None
    params = [constant(name) for name in node.input[1:]]
    if any(p is None or p.ndim != 1 for p in params) or len({p.shape for p in params}) != 1:
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    shift = beta - mean * scale
    with np.errstate(over="ignore", invalid="ignore"):
        fits = np.isfinite(scale.astype(dtype)).all() and np.isfinite(shift.astype(dtype)).all()
    return Affine(node, scale, shift) if fits else None


def fold(weight: np.ndarray, bias: np.ndarray | None,
         bn: Affine) -> tuple[np.ndarray, np.ndarray] | None:
    """Weight ``[M, ...]`` and bias ``[M]`` of the conv followed by ``bn``, in the weight's
    dtype; ``None`` when a folded value overflows that dtype.

    A weight broadcast along some axes (a folded ``ConstantOfShape``) is scaled once per
    distinct value and stays broadcast: scaling the full array cost the most of a rewrite of
    light_resnet50 (three full-size temporaries per conv, then copies of the result).
    """
    scale = bn.scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    base = np.zeros(bn.channels) if bias is None else bias.astype(np.float64)
    core = _without_broadcast_axes(weight)
    with np.errstate(over="ignore", invalid="ignore"):
        new_core = _scaled(core, scale)
        new_bias = (base * bn.scale + bn.shift).astype(weight.dtype)
    if not (np.isfinite(new_core).all() and np.isfinite(new_bias).all()):
        return None
    new_weight = new_core if core is weight else np.broadcast_to(new_core, weight.shape)
    return new_weight, new_bias


def _without_broadcast_axes(array: np.ndarray) -> np.ndarray:
    """``array`` with its broadcast axes (stride 0 and longer than 1) cut to length 1."""
    if all(stride or length <= 1 for stride, length in zip(array.strides, array.shape)):
        return array
    return array[tuple(slice(None) if stride else slice(0, 1) for stride in array.strides)]


def _scaled(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``weight * scale`` computed in float64 and rounded once to the weight's dtype; a float
    weight is multiplied in one pass, without a float64 copy of it."""
    if weight.dtype.kind != "f":  # e.g. ml_dtypes' bfloat16: its own casts
        return (weight.astype(np.float64) * scale).astype(weight.dtype)
    out = np.empty(np.broadcast_shapes(weight.shape, scale.shape), weight.dtype)
    return np.multiply(weight, scale, out=out, dtype=np.float64, casting="unsafe")


def emit_affine(bn: Affine, rank: int, dtype: np.dtype, em: Emitter) -> None:
    """``Mul`` and ``Add`` by ``[C, 1, ..., 1]`` constants for an input of ``rank`` dims."""
    shape = (bn.channels,) + (1,) * (rank - 2)
    scaled = em.op("Mul", [bn.node.input[0],
                           em.const("scale", bn.scale.astype(dtype).reshape(shape))], "scale")
    em.op("Add", [scaled, em.const("shift", bn.shift.astype(dtype).reshape(shape))], "shift",
          output=bn.node.output[0])
