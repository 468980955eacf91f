"""``subpixel``: a ConvTranspose as one ordinary conv over its input plus a pixel shuffle.

Along an axis with stride ``s``, output ``o = j*s + r`` only receives kernel offsets ``k``
with ``k*d = q*s + r``, each reading input ``j - q``. So every phase ``r`` is a small conv
over the *input* whose kernel holds the offsets of that phase at shift ``q``. All phases
together are one conv with ``M * prod(s)`` output channels and a ``(q_max + 1)``-wide kernel,
lowered by the usual Conv lowerings (pointwise when the kernel equals the stride, im2col
otherwise: channels-last patches and one MatMul with the precomputed weight as ``B``).
A Reshape/Transpose/Reshape interleaves the phases (depth-to-space), a Slice or Pad cuts
the padded window, and an Add applies the bias. No Col2Im, so it runs on every provider.

Matches every ConvTranspose whose pads are known (all but ``output_shape`` with a run-time
input size). Rows that the crop would discard entirely are never computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..conv import ConvSpec
from ..convtranspose import ConvTransposeSpec
from ..emit import Emitter
from . import fc, im2col, pointwise
from .operands import Operand, Operands, is_runtime

NAME = "subpixel"
INT64_MAX = np.iinfo(np.int64).max

# Conv lowerings the phase conv may use, cheapest first; only these take run-time weights.
PHASE_LOWERINGS = (pointwise, fc, im2col)
RUNTIME_PHASE_LOWERINGS = (pointwise, im2col)


@dataclass(frozen=True)
class _Axis:
    """How one spatial axis is computed; ``I`` is the input size.

    The phase conv produces rows ``[first_row, I + row_end)`` of every phase, which cover
    uncropped positions ``[first_row*s, (I + row_end)*s)``. The output window starts
    ``crop_begin`` into that and ends ``crop_end`` past its end (negative: before it).
    """

    shift: int
    first_row: int
    row_end: int
    crop_begin: int
    crop_end: int


def _axes(spec: ConvTransposeSpec) -> list[_Axis]:
    axes = []
    for i, (s, span, end) in enumerate(zip(spec.strides, spec.spans, spec.window_ends())):
        begin = spec.pads[i]
        first_row = begin // s
        # The kernel reaches uncropped position I*s + span - s - 1 at most: stop there.
        row_end = -(-min(end, span - s) // s)
        axes.append(_Axis(shift=(span - 1) // s, first_row=first_row, row_end=row_end,
                          crop_begin=begin - first_row * s, crop_end=end - row_end * s))
    return axes


def applies(spec: ConvTransposeSpec) -> str | None:
    if spec.pads is None:
        return "output_shape is set but an input size is only known at run time"
    for size, axis in zip(spec.input_spatial, _axes(spec)):
        if size is not None and size + axis.row_end <= axis.first_row:
            return "the output lies entirely in the padding"
    return None


def emit(spec: ConvTransposeSpec, weight: Operand, bias: Operand | None, em: Emitter) -> None:
    axes = _axes(spec)
    ops = Operands(em)
    phases = int(np.prod(spec.strides))
    shuffle, crop, extend = phases > 1, _crop(axes), _extend(axes)
    last = [step for step, wanted in (("conv", True), ("shuffle", shuffle), ("crop", crop),
                                      ("extend", extend), ("bias", bias is not None)) if wanted][-1]

    def out(step: str) -> str | None:
        return spec.output if step == last else None

    phase_spec = _phase_spec(spec, axes, _trim_input(spec, axes, em),
                             out("conv") or em.pool.names.take(f"{em.prefix}/phases_out"))
    phase_weight = _phase_weight(ops, weight, spec, axes)
    choices = RUNTIME_PHASE_LOWERINGS if is_runtime(phase_weight) else PHASE_LOWERINGS
    lowering = next(m for m in choices if m.applies(phase_spec) is None)
    lowering.emit(phase_spec, phase_weight, None, em)
    y = phase_spec.output
    if shuffle:
        y = _depth_to_space(spec, em, y, out("shuffle"))
    r = spec.rank
    spatial = em.ints("spatial_axes", list(range(2, r + 2)))
    if crop:
        ends = [a.crop_end if a.crop_end < 0 else INT64_MAX for a in axes]
        y = em.op("Slice", [y, em.ints("crop_starts", [a.crop_begin for a in axes]),
                            em.ints("crop_ends", ends), spatial], "crop", output=out("crop"))
    if extend:
        widths = [0, 0] + [0] * r + [0, 0] + [max(0, a.crop_end) for a in axes]
        y = em.op("Pad", [y, em.ints("extend_pads", widths)], "extend", output=out("extend"))
    if bias is not None:
        per_channel = ops.reshape(bias, (spec.out_channels,) + (1,) * r, "bias_per_channel")
        em.op("Add", [y, ops.name(per_channel, "bias")], "AddBias", output=out("bias"))


def _crop(axes: list[_Axis]) -> bool:
    return any(a.crop_begin or a.crop_end < 0 for a in axes)


def _extend(axes: list[_Axis]) -> bool:
    return any(a.crop_end > 0 for a in axes)


def _trim_input(spec: ConvTransposeSpec, axes: list[_Axis], em: Emitter) -> str:
    """Drop input rows that only feed discarded output rows (pads beyond the kernel's reach)."""
    starts = [max(0, a.first_row - a.shift) for a in axes]
    ends = [a.row_end if a.row_end < 0 else INT64_MAX for a in axes]
    if not any(starts) and all(e == INT64_MAX for e in ends):
        return spec.input
    return em.op("Slice", [spec.input, em.ints("trim_starts", starts), em.ints("trim_ends", ends),
                           em.ints("trim_axes", list(range(2, spec.rank + 2)))], "trim_input")


def _phase_spec(spec: ConvTransposeSpec, axes: list[_Axis], x: str, output: str) -> ConvSpec:
    """The ordinary conv computing every phase: stride 1, kernel ``shift + 1`` per axis."""
    r = spec.rank
    begins = [max(0, a.shift - a.first_row) for a in axes]
    ends = [max(0, a.row_end) for a in axes]
    spatial = tuple(
        None if size is None else size - max(0, a.first_row - a.shift) - max(0, -a.row_end)
        for size, a in zip(spec.input_spatial, axes))
    return ConvSpec(
        name=spec.name, input=x, weight=spec.weight, bias=None, output=output,
        in_channels=spec.in_channels, out_channels=spec.out_channels * int(np.prod(spec.strides)),
        group=spec.group, kernel=tuple(a.shift + 1 for a in axes), strides=(1,) * r,
        dilations=(1,) * r, pads=tuple(begins + ends), auto_pad="NOTSET", input_spatial=spatial)


def tap_table(spec: ConvTransposeSpec, axes: list[_Axis]) -> np.ndarray:
    """``[prod(s), prod(shift + 1)]``: which kernel offset feeds (phase, phase-kernel offset).

    Offset ``k`` lands in phase ``k*d % s`` at shift ``q = k*d // s``, which the phase conv
    reads at its kernel offset ``shift - q``. Unused entries hold ``taps``, the index of
    the zero block appended to the taps.
    """
    kernel = spec.kernel
    taps = int(np.prod(kernel))
    grid = np.indices(kernel).reshape(spec.rank, taps)  # per axis, the offset of each tap
    reach = grid * np.array(spec.dilations)[:, None]
    strides = np.array(spec.strides)[:, None]
    shifts = np.array([a.shift for a in axes])[:, None]
    phase = np.ravel_multi_index(tuple(reach % strides), spec.strides)
    offset = np.ravel_multi_index(tuple(shifts - reach // strides), tuple(shifts[:, 0] + 1))
    table = np.full((int(np.prod(spec.strides)), int(np.prod(shifts + 1))), taps, np.int64)
    table[phase, offset] = np.arange(taps)
    return table


def _phase_weight(ops: Operands, weight: Operand, spec: ConvTransposeSpec,
                  axes: list[_Axis]) -> Operand:
    """``[C, M/g, k...]`` -> the phase conv's ``[M * prod(s), C/g, (shift + 1)...]``.

    Output channels are ordered (M, phase), so a depth-to-space splits them back.
    """
    g, cg, mg = spec.group, spec.in_per_group, spec.out_per_group
    taps = int(np.prod(spec.kernel))
    table = tap_table(spec, axes)
    w = ops.reshape(weight, (g, cg, mg, taps), "taps")
    w = ops.transpose(w, (0, 2, 3, 1), "taps_last")                 # [g, Mg, taps, Cg]
    w = ops.pad_end(w, 2, 1, "zero_tap")                            # [g, Mg, taps + 1, Cg]
    w = ops.gather(w, table, 2, "place_taps")                       # [g, Mg, S, W, Cg]
    w = ops.transpose(w, (0, 1, 2, 4, 3), "phase_kernel")           # [g, Mg, S, Cg, W]
    return ops.reshape(w, (spec.out_channels * table.shape[0], cg) + tuple(
        a.shift + 1 for a in axes), "phase_weight")


def _depth_to_space(spec: ConvTransposeSpec, em: Emitter, y: str, output: str | None) -> str:
    """``[N, M * prod(s), J...]`` -> ``[N, M, J_1 * s_1, ...]``, phases interleaved."""
    r, m = spec.rank, spec.out_channels
    shape = em.op("Shape", [y], "phase_shape")
    rows = em.op("Slice", [shape, em.ints("rows_start", [2]), em.ints("rows_end", [2 + r])],
                 "phase_rows")
    split = em.op("Concat", [em.ints("phase_dims", [0, m, *spec.strides]), rows],
                  "split_shape", axis=0)
    y = em.op("Reshape", [y, split], "split_phases")
    interleave = [0, 1] + [a for i in range(r) for a in (2 + r + i, 2 + i)]
    y = em.op("Transpose", [y], "interleave", perm=interleave)
    merged = em.op("Mul", [rows, em.ints("strides", spec.strides)], "merged_rows")
    merge = em.op("Concat", [em.ints("merged_dims", [0, m]), merged], "merge_shape", axis=0)
    return em.op("Reshape", [y, merge], "merge_phases", output=output)

