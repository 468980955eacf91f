"""Operands that are either constants or tensors the graph computes at run time.

A conv's weight, bias, scales and zero points are usually initializers, and the lowerings
precompute what they need from them in numpy. When one is a graph input or the output of
non-constant nodes (dynamic filters, hypernetworks, every ONNX node test), the same
reshapes and transposes must run in the graph instead. ``Operands`` offers each such step
once: on an ``np.ndarray`` it returns the numpy result, on a ``Runtime`` tensor it emits the
node and returns a new ``Runtime``. A weight transform written with it serves both cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from ..emit import Emitter
from .weights import patch_weight


@dataclass(frozen=True)
class Runtime:
    """A tensor computed at run time: its name and its static shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


Operand = Union[np.ndarray, Runtime]


def is_runtime(value: Operand | None) -> bool:
    return isinstance(value, Runtime)


def shape_of(value: Operand) -> tuple[int, ...]:
    return tuple(value.shape)


class Operands:
    """Shape steps on operands: numpy for constants, emitted nodes for run-time tensors."""

    def __init__(self, em: Emitter) -> None:
        self.em = em

    def name(self, value: Operand, what: str) -> str:
        """The tensor name of ``value``, storing it as a constant when it is an array."""
        return value.name if isinstance(value, Runtime) else self.em.const(what, value)

    def reshape(self, value: Operand, shape: Sequence[int], what: str) -> Operand:
        shape = _resolve(shape_of(value), tuple(shape))
        if not isinstance(value, Runtime):
            return value.reshape(shape)
        if shape == value.shape:
            return value
        out = self.em.op("Reshape", [value.name, self.em.ints(f"{what}_shape", shape)], what)
        return Runtime(out, shape)

    def transpose(self, value: Operand, perm: Sequence[int], what: str) -> Operand:
        perm = tuple(perm)
        if not isinstance(value, Runtime):
            return np.ascontiguousarray(value.transpose(perm))
        if perm == tuple(range(value.ndim)):
            return value
        out = self.em.op("Transpose", [value.name], what, perm=list(perm))
        return Runtime(out, tuple(value.shape[p] for p in perm))

    def pad_end(self, value: Operand, axis: int, count: int, what: str) -> Operand:
        """Append ``count`` zeros along ``axis``."""
        widths = [0] * (2 * len(value.shape))
        widths[len(value.shape) + axis] = count
        if not isinstance(value, Runtime):
            return np.pad(value, [(0, widths[len(value.shape) + i])
                                  for i in range(len(value.shape))])
        out = self.em.op("Pad", [value.name, self.em.ints(f"{what}_pads", widths)], what)
        shape = list(value.shape)
        shape[axis] += count
        return Runtime(out, tuple(shape))

    def gather(self, value: Operand, indices: np.ndarray, axis: int, what: str) -> Operand:
        """``take(value, indices, axis)`` with a constant int64 ``indices``."""
        if not isinstance(value, Runtime):
            return np.take(value, indices, axis=axis)
        out = self.em.op("Gather", [value.name, self.em.const(f"{what}_indices", indices)],
                         what, axis=axis)
        shape = value.shape[:axis] + indices.shape + value.shape[axis + 1:]
        return Runtime(out, shape)

    def binary(self, op_type: str, a: Operand, b: Operand, what: str) -> Operand:
        """``Mul``/``Div``/``Add`` with numpy broadcasting, in the operands' own dtype."""
        if not isinstance(a, Runtime) and not isinstance(b, Runtime):
            ufunc = {"Mul": np.multiply, "Div": np.divide, "Add": np.add}[op_type]
            return ufunc(a, b).astype(np.result_type(a, b))
        out = self.em.op(op_type, [self.name(a, f"{what}_a"), self.name(b, f"{what}_b")], what)
        return Runtime(out, tuple(np.broadcast_shapes(shape_of(a), shape_of(b))))


def patch_matrix(ops: Operands, weight: Operand, group: int) -> Operand:
    """``weights.patch_weight`` for a constant, the same layout built by nodes otherwise:
    ``[M, C/g, k...]`` -> ``[taps*C, M]`` (group 1) or ``[g, taps*C/g, M/g]``."""
    if not isinstance(weight, Runtime):
        return patch_weight(weight, group)
    m, cg = weight.shape[:2]
    taps = int(np.prod(weight.shape[2:], dtype=np.int64))
    w = ops.reshape(weight, (group, m // group, cg, taps), "weight_taps")
    w = ops.transpose(w, (0, 3, 2, 1), "weight_taps_first")
    shape = (taps * cg, m) if group == 1 else (group, taps * cg, m // group)
    return ops.reshape(w, shape, "weight_matrix")


def _resolve(old: tuple[int, ...], new: tuple[int, ...]) -> tuple[int, ...]:
    """Replace a ``-1`` in ``new`` by the size that keeps the element count."""
    if -1 not in new:
        return new
    known = int(np.prod([d for d in new if d != -1], dtype=np.int64))
    total = int(np.prod(old, dtype=np.int64))
    return tuple(total // known if d == -1 else d for d in new)
