"""``subpixel``: a ConvTranspose as one ordinary conv over its input plus a pixel shuffle.

Along an axis with stride ``s``, output ``o = j*s + r`` only receives kernel offsets ``k``
with ``k*d = q*s + r``, each reading input ``j - q``. So every phase ``r`` is a small conv
over the *input* whose kernel holds the offsets of that phase at shift ``q``. All phases
together are one conv with ``M * prod(s)`` output channels and a ``(q_max + 1)``-wide kernel:
Conv's channels-last patches of the input (the input itself when the kernel equals the
stride) times one precomputed weight ``B`` (FC form). Reshape/Transpose/Reshape interleave
the phases (depth-to-space) and return to channels-first, a Slice or Pad cuts the padded
window, an Add applies the bias. No Col2Im, so it runs on every provider.

Matches every ConvTranspose whose pads are known (all but ``output_shape`` with a run-time
input size). Input rows that only feed cropped rows are never computed. ``B`` holds
``prod(q_max + 1) * C/g`` rows, more than the kernel's taps when ``k*d`` is not a multiple
of the stride (3x3 stride 2: 16 instead of 9 per channel pair), the unused ones zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..conv import ConvSpec
from ..convtranspose import ConvTransposeSpec
from ..emit import Emitter
from .operands import Operand, Operands, is_runtime, patch_matrix
from .patches import PatchRows, patch_rows
from .taps import INT64_MAX, shape_target, slice_refusal

NAME = "subpixel"


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
    axes = _axes(spec)
    for i, (size, axis) in enumerate(zip(spec.input_spatial, axes)):
        if size is not None and size + axis.row_end <= axis.first_row:
            return "the output lies entirely in the padding"
        # A run-time size up to ``empty`` gives the phase conv no rows; refused where the
        # original still has output there (output_padding beyond the cropped rows):
        # ``crop_end > crop_begin``, i.e. ``empty * stride + window_end > pad_begin``.
        empty = axis.first_row - axis.row_end
        if size is None and empty >= 1 and axis.crop_end > axis.crop_begin:
            return (f"an input of up to {empty} along axis {i + 2}, whose size is only known "
                    "at run time, gives an output entirely in the padding")
    return slice_refusal(_phase_spec(spec, axes, spec.input, spec.output))


def emit(spec: ConvTransposeSpec, weight: Operand, bias: Operand | None, em: Emitter) -> None:
    axes = _axes(spec)
    ops = Operands(em)
    crop, extend = _crop(axes), _extend(axes)
    # A constant bias rides on the GEMM result (tiled per phase) unless Pad adds positions.
    early_bias = bias is not None and not is_runtime(bias) and not extend
    late_bias = bias is not None and not early_bias
    last = [step for step, wanted in (("shuffle", True), ("crop", crop), ("extend", extend),
                                      ("bias", late_bias)) if wanted][-1]

    def out(step: str) -> str | None:
        return spec.output if step == last else None

    phase_spec = _phase_spec(spec, axes, _trim_input(spec, axes, em),
                             out("shuffle") or em.fresh("phases_out"))
    rows = patch_rows(phase_spec, em)
    matrix = patch_matrix(ops, _phase_weight(ops, weight, spec, axes), spec.group)
    y = em.op("MatMul", [rows.rows, ops.name(matrix, "weight")])
    if early_bias:
        y = em.op("Add", [y, em.const("bias", _tiled_bias(spec, bias))], "AddBias")
    y = _depth_to_space(spec, phase_spec, em, y, rows)
    r = spec.rank
    spatial = em.ints("spatial_axes", list(range(2, r + 2)))
    if crop:
        ends = [a.crop_end if a.crop_end < 0 else INT64_MAX for a in axes]
        y = em.op("Slice", [y, em.ints("crop_starts", [a.crop_begin for a in axes]),
                            em.ints("crop_ends", ends), spatial], "crop", output=out("crop"))
    if extend:
        widths = [0, 0] + [0] * r + [0, 0] + [max(0, a.crop_end) for a in axes]
        y = em.op("Pad", [y, em.ints("extend_pads", widths)], "extend", output=out("extend"))
    if late_bias:
        per_channel = ops.reshape(bias, (spec.out_channels,) + (1,) * r, "bias_per_channel")
        em.op("Add", [y, ops.name(per_channel, "bias")], "AddBias", output=out("bias"))


def _tiled_bias(spec: ConvTransposeSpec, bias: np.ndarray) -> np.ndarray:
    """The bias per GEMM column, ordered (phase, M/g) like the phase weight's columns."""
    per_group = bias.reshape(spec.group, 1, spec.out_per_group)
    tiled = np.tile(per_group, (1, 1, int(np.prod(spec.strides))))
    return tiled.reshape(-1) if spec.group == 1 else tiled


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


def phase_conv(spec: ConvTransposeSpec) -> ConvSpec:
    """The ordinary conv ``emit`` lowers for ``spec``, over the untrimmed input's name: what
    ``budget.py`` sizes."""
    return _phase_spec(spec, _axes(spec), spec.input, spec.output)


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

    Output channels are ordered (group, phase, M/g), so within a group the GEMM columns
    split as ``[s..., M/g]`` and the phases interleave channels-last.
    """
    g, cg, mg = spec.group, spec.in_per_group, spec.out_per_group
    taps = spec.taps
    table = tap_table(spec, axes)
    w = ops.reshape(weight, (g, cg, mg, taps), "taps")
    w = ops.transpose(w, (0, 3, 2, 1), "taps_first")                # [g, taps, Mg, Cg]
    w = ops.pad_end(w, 1, 1, "zero_tap")                            # [g, taps + 1, Mg, Cg]
    w = ops.gather(w, table, 1, "place_taps")                       # [g, S, W, Mg, Cg]
    w = ops.transpose(w, (0, 1, 3, 4, 2), "phase_kernel")           # [g, S, Mg, Cg, W]
    return ops.reshape(w, (spec.out_channels * table.shape[0], cg) + tuple(
        a.shift + 1 for a in axes), "phase_weight")


def _depth_to_space(spec: ConvTransposeSpec, phase_spec: ConvSpec, em: Emitter, y: str,
                    rows: PatchRows) -> str:
    """GEMM result -> ``[N, M, J_1 * s_1, ...]``: phases interleaved, channels first.

    ``y`` is ``[N, J..., S * M]`` (group 1) or ``[N, g, L, S * M/g]``, columns ordered
    (phase, channel). Group 1 interleaves channels-last, where each copied block is
    ``s_r * M`` contiguous values (no Transpose at all in 1-D), then moves the channels first
    with the usual NHWC -> NCHW Transpose: much faster on onnxruntime than one 6-D Transpose.
    """
    r, g, strides = spec.rank, spec.group, list(spec.strides)
    rows_static = phase_spec.output_spatial()
    merged = tuple(None if j is None else j * s for j, s in zip(rows_static, strides))
    interleave = [a for i in range(r) for a in (i, r + i)]  # (J_i, s_i) pairs, in order
    if g == 1:  # [N, J..., s..., M] -> [N, J_1, s_1, ..., M] -> [N, O..., M] -> [N, M, O...]
        split = em.ints("split_shape", [0] * (r + 1) + strides + [spec.out_channels])
        y = em.op("Reshape", [y, split], "split_phases")
        if r > 1:
            y = em.op("Transpose", [y], "interleave",
                      perm=[0] + [1 + a for a in interleave] + [2 * r + 1])
        merge = shape_target(em, "merge_shape", [0], merged, rows.grid, 1,
                             [spec.out_channels], strides)
        y = em.op("Reshape", [y, merge], "merge_phases")
        return em.op("Transpose", [y], "to_channels_first", perm=[0, r + 1, *range(1, r + 1)],
                     output=phase_spec.output)
    # [N, g, J..., s..., M/g] -> [N, g, M/g, J_1, s_1, ...] -> [N, M, O...]
    split = shape_target(em, "split_shape", [0, 0], rows_static, rows.grid, 2,
                         strides + [spec.out_per_group])
    y = em.op("Reshape", [y, split], "split_phases")
    y = em.op("Transpose", [y], "interleave",
              perm=[0, 1, 2 * r + 2] + [2 + a for a in interleave])
    merge = shape_target(em, "merge_shape", [0, spec.out_channels], merged, rows.grid, 2,
                         scale=strides)
    return em.op("Reshape", [y, merge], "merge_phases", output=phase_spec.output)
