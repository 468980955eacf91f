"""Patch matrices followed by one GEMM: the body of ``im2col`` and ``pointwise``.

Patches are rows ``[N, out..., taps*C]`` (``[N, g, L, taps*C/g]`` for grouped convs), ordered
(kernel offset, channel) to match ``weights.patch_weight``, and multiplied by the precomputed
weight ``B``. How the rows are built depends on what onnxruntime copies fastest (measured in
``docs/performance.md``):

- **gather** (static spatial sizes, at least ``SHORT_ROW_CHANNELS`` channels per group or a
  kernel of over ``taps.MAX_SLICE_TAPS`` taps):
  channels-last input, Pad, Reshape to ``[N, pixels, C]``, one ``Gather`` of whole C-rows
  with int32 indices ``[out..., taps]``, Reshape. One copy of the patch matrix. The indices
  are stored as per-axis parts whose sum onnxruntime folds (``taps.index_parts``); the
  parts are shared by every conv of the same geometry. Group 1 GEMMs gather and multiply
  per chunk of output rows (``CHUNK_BYTES``) when the patch matrix is larger than a
  chunk, so that the MatMul reads its patches from cache, and Concat the results.
- **channels-first** (fewer channels, e.g. an RGB stem, where a C-row is too short to copy
  well): Pad and one strided ``Slice`` per kernel offset on the NCHW input, Concat on the
  channel axis, one Transpose of the patches to rows. With ``--weight-left`` (group 1,
  static output sizes) the Concat is already ``[N, taps*C, out...]``: the weight goes on
  the left of the MatMul and neither Transpose is built (``weight_left_gemm``).
- **slices** (dynamic spatial sizes, and 1x1 kernels): channels-last input, Pad, one strided
  ``Slice`` per kernel offset (ends are negative offsets from the end, so the graph stays
  valid for any run-time size), Concat on channels. Over ``taps.MAX_SLICE_TAPS`` taps no
  Slice form is built: ``taps.slice_refusal`` says why, and each lowering's ``applies`` returns it.

Depthwise convs have a GEMM-free lowering of their own, ``depthwise.py``.

``patch_rows`` and ``to_channels_first`` are the two halves around the GEMM, shared with the
integer and ConvTranspose lowerings (the integer ones pad with the input zero point and
multiply with MatMulInteger). The weight and bias may be tensors computed at run time; their
layout is then built by nodes in the graph (``operands.patch_matrix``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..conv import ConvSpec
from ..emit import Emitter
from .operands import Operand, Operands, is_runtime, patch_matrix
from .taps import (
    MAX_SLICE_TAPS,
    axis_by_axis_patches,
    index_parts,
    pad_input,
    row_chunks,
    runs,
    runtime_dims,
    shape_target,
    sum_constants,
    tap_slices,
)

# Below this many channels per group a C-row is too short for a Gather or channels-last
# Slices to copy well; channels-first Slices win (measured: C=8 and C=3 stems).
SHORT_ROW_CHANNELS = 16
# Patch matrices up to this size are built one axis at a time even without a stride: node
# count, not bytes, is their cost (3x3 32->32 g4 @16, 295 KiB: 2.38x -> 2.18x the Conv;
# 8->16 @56, 903 KiB: 2.33x -> 2.41x).
SMALL_PATCH_BYTES = 512 << 10
# Reshape reads a 0 in its shape as "copy this dim" unless allowzero=1 (opset 14 on). A
# run-time shape's only possible 0 is an empty batch (onnxruntime's Conv refuses empty
# spatial dims), and copying the GEMM's dim 0 (N*pixels) gives that same 0, so older opsets
# go without.
ALLOW_ZERO_OPSET = 14
# Output from which a pinned-size GEMM reads its shape at run time to get its bias fused:
# three small nodes (~5 us) against an Add pass over the output (~10 us per 100 KB).
RUNTIME_SHAPE_BYTES = 64 << 10
# Patches per Gather + MatMul when a group 1 patch matrix is larger. Measured (1 thread /
# 2 threads): 3x3 96->24 @160x160 1.42x the Conv in 1 MiB chunks, 1.38x in 4 MiB, 2.07x
# unchunked; 128->32 @56x56 1.35x (1 MiB) vs 1.83x; PP-OCRv4 det 1.89x / 2.38x in 1 MiB
# chunks, 1.90x / 2.04x in 4 MiB (two threads need larger GEMMs to share).
CHUNK_BYTES = 4 << 20
WEIGHT_LEFT_NODE = "weight_left_MatMul"  # the one MatMul whose constant weight is A


@dataclass(frozen=True)
class PatchRows:
    """Patches ready for a GEMM over their last axis, and what restores ``[N, M, out...]``.

    ``rows`` is ``[N, out..., taps*C]`` (group 1) or ``[N, g, L, taps*C/g]`` (grouped, the
    ``L`` output positions flattened); ``grid`` holds the output spatial sizes on its axes
    ``1..r`` (group 1) or ``2..r+1`` (grouped), read from it when they are only known at run
    time.
    """

    rows: str
    grid: str


def emit_patch_gemm(spec: ConvSpec, weight: Operand, bias: Operand | None,
                    em: Emitter) -> None:
    g = spec.group
    ops = Operands(em)
    matrix = patch_matrix(ops, weight, g)
    constant = not is_runtime(matrix)
    if constant:
        chunks = gemm_chunks(spec, matrix.dtype.itemsize)
        if len(chunks) > 1:
            _chunked_gemm(spec, em, runs(chunks), ops.name(matrix, "weight"),
                          None if bias is None else ops.name(bias, "bias"))
            return
        if em.options.weight_left and takes_weight_left_patches(spec):
            _weight_left_patch_gemm(spec, em, matrix, bias)
            return
    rows = patch_rows(spec, em)
    if g == 1:
        # --input-shape makes sizes static for the rewrite only: a form that works at any
        # size (Slices) keeps doing so, reading its output grid at run time
        pinned = bool(em.options.input_shapes) and not uses_gather(spec) and constant
        y = _gemm(spec, em, rows.rows, ops.name(matrix, "weight"),
                  None if bias is None else ops.name(bias, "bias"),
                  pinned_dtype=matrix.dtype if pinned else None)
        to_channels_first(spec, em, y, rows)
        return
    if em.options.split_groups and constant:
        y = _matmul_per_group(em, rows.rows, matrix)
    else:
        y = em.op("MatMul", [rows.rows, ops.name(matrix, "weight")])
    if bias is not None:  # added channels-first, in runs of L values, not of M/g
        bias = ops.name(ops.reshape(bias, (g, spec.out_per_group, 1), "bias_per_group"), "bias")
    to_channels_first(spec, em, y, rows, bias)


def takes_weight_left_patches(spec: ConvSpec) -> bool:
    """Group 1 channels-first patches of static output size."""
    return (spec.group == 1 and uses_channels_first(spec)
            and None not in spec.output_spatial())


def _weight_left_patch_gemm(spec: ConvSpec, em: Emitter, matrix: np.ndarray,
                            bias: Operand | None) -> None:
    """Channels-first patches ``[N, taps*C, out...]`` times the weight from the left.
    Measured (1 thread): MNIST 2.31x -> 2.03x the original."""
    x = pad_input(spec, em, spec.input, 2, None, channels_last=False)
    patches = _slice_patches(spec, em, x, 2, channel_axis=1)
    weight_left_gemm(spec, em, patches, matrix.T, bias)


def weight_left_gemm(spec: ConvSpec, em: Emitter, x: str, matrix: np.ndarray,
                     bias: Operand | None) -> None:
    """``matrix [M, K] @ x [N, K, out...]`` (flattened to ``[N, K, pixels]``), plus the bias
    as a column, reshaped to ``spec.output``: channels-first in and out, no Transposes."""
    m, k = matrix.shape
    out = [int(o) for o in spec.output_spatial()]
    x = em.op("Reshape", [x, em.ints("pixels_shape", [0, k, math.prod(out)])],
              "flatten_pixels")
    y = em.op("MatMul", [em.const("weight", matrix), x], WEIGHT_LEFT_NODE)
    if bias is not None:
        ops = Operands(em)
        y = em.op("Add", [y, ops.name(ops.reshape(bias, (m, 1), "bias_column"), "bias")],
                  "AddBias")
    em.op("Reshape", [y, em.ints("out_shape", [0, m, *out])], "unflatten", output=spec.output)


def _gemm(spec: ConvSpec, em: Emitter, rows: str, weight: str, bias: str | None,
          grid: tuple[int | None, ...] | None = None, suffix: str = "",
          pinned_dtype: np.dtype | None = None) -> str:
    """``rows [N, grid..., K] @ weight + bias``, group 1 (``grid``: the conv's output grid
    unless given).

    With a bias and a static grid, as a 2-D MatMul + Add between Reshapes: onnxruntime
    fuses those into one Gemm whatever the batch, where it fuses the N-D form only when every
    dim is static (PP-OCRv4 det, whose sizes are symbolic, kept 7 ms of bias Adds a run).
    ``pinned_dtype`` (the weight's): the grid is static only through ``--input-shape`` and
    the patches work at any size, so the result's shape is read from ``rows`` at run time,
    which costs three small nodes: only over ``RUNTIME_SHAPE_BYTES`` of output. Its rank is
    declared: onnxruntime moves a Transpose only across tensors of known rank (PP-OCRv4 det
    kept 161 more Transposes without it: 1.92x the original, 1.63x with it)."""
    grid = spec.output_spatial() if grid is None else grid
    m = spec.out_channels
    static = None not in grid and all(grid)
    pinned = pinned_dtype is not None
    fused = bias is not None and static and (
        not pinned or math.prod(grid) * m * 4 >= RUNTIME_SHAPE_BYTES)
    if not fused:
        y = em.op("MatMul", [rows, weight], f"MatMul{suffix}")
        return y if bias is None else em.op("Add", [y, bias], f"AddBias{suffix}")
    k = spec.taps * spec.in_channels
    flat = em.op("Reshape", [rows, em.ints("gemm_rows_shape", [-1, k])], f"gemm_rows{suffix}")
    y = em.op("Add", [em.op("MatMul", [flat, weight], f"MatMul{suffix}"), bias],
              f"AddBias{suffix}")
    if not pinned:
        shape = em.ints(f"gemm_out_shape_{grid[0]}", [-1, *map(int, grid), m])
        return em.op("Reshape", [y, shape], f"gemm_out{suffix}")
    shape = em.op("Concat", [runtime_dims(em, rows, 0, 1 + spec.rank),
                             em.ints("out_channels", [m])], "gemm_out_shape", axis=0)
    allow_zero = {"allowzero": 1} if (em.opset or 0) >= ALLOW_ZERO_OPSET else {}
    y = em.op("Reshape", [y, shape], f"gemm_out{suffix}", **allow_zero)
    em.declare(y, pinned_dtype, 2 + spec.rank)
    return y


def patch_rows(spec: ConvSpec, em: Emitter, pad_value: str | None = None) -> PatchRows:
    """Patches of ``spec.input`` as GEMM rows; padding holds ``pad_value`` (a scalar tensor)
    instead of zeros when given."""
    if uses_gather(spec):
        return _gather_rows(spec, em, pad_value)
    if uses_channels_first(spec):
        return _channels_first_rows(spec, em, pad_value)
    return _slice_rows(spec, em, pad_value)


def uses_gather(spec: ConvSpec) -> bool:
    """The gather form: static sizes and several taps, with C-rows long enough to copy well
    or more taps than ``MAX_SLICE_TAPS`` Slices."""
    return spec.taps > 1 and spec.is_static and (
        spec.in_per_group >= SHORT_ROW_CHANNELS or spec.taps > MAX_SLICE_TAPS)


def uses_channels_first(spec: ConvSpec) -> bool:
    """The channels-first Slices: several taps over C-rows too short for the other forms."""
    return spec.taps > 1 and spec.in_per_group < SHORT_ROW_CHANNELS and not uses_gather(spec)


def _slice_rows(spec: ConvSpec, em: Emitter, pad_value: str | None) -> PatchRows:
    """Channels-last input, Pad, one strided Slice per kernel offset, Concat on channels."""
    x, first_axis = _channels_last(spec, em)
    x = pad_input(spec, em, x, first_axis, pad_value)
    patches = _slice_patches(spec, em, x, first_axis, channel_axis=-1)
    return _flatten_groups(spec, em, patches)


def _channels_first_rows(spec: ConvSpec, em: Emitter, pad_value: str | None) -> PatchRows:
    """Pad and Slice the NCHW input (whole rows of pixels per copy), Concat the taps on the
    channel axis (tap-major, as ``patch_weight``), one Transpose to channels-last rows."""
    r, g = spec.rank, spec.group
    x, first_axis = (_split_groups(spec, em), 3) if g > 1 else (spec.input, 2)
    x = pad_input(spec, em, x, first_axis, pad_value, channels_last=False)
    patches = _slice_patches(spec, em, x, first_axis, channel_axis=first_axis - 1)
    lead = list(range(first_axis - 1))
    patches = em.op("Transpose", [patches], "patches_to_rows",
                    perm=[*lead, *range(first_axis, first_axis + r), first_axis - 1])
    return _flatten_groups(spec, em, patches)


def _slice_patches(spec: ConvSpec, em: Emitter, x: str, first_axis: int,
                   channel_axis: int) -> str:
    """The Slice forms' patches: one axis at a time (``taps.axis_by_axis_patches``, fewer
    nodes) for strided convs and small patch matrices, one Slice per tap otherwise, where
    the first axis' intermediate copy would cost more than the nodes it saves. Measured
    (1 thread): MNIST 3.10x -> 2.31x, 7x7/s2 3->64 @224 2.67x -> 2.38x, 3x3/s2 3->16 @640
    3.79x -> 3.39x; stride 1 over large maps lost (3x3 64->64 @56, sizes at run time:
    1.69x -> 1.94x; 8->16 @112 2.82x -> 3.01x)."""
    if any(s > 1 for s in spec.strides) or _patch_bytes(spec) <= SMALL_PATCH_BYTES:
        return axis_by_axis_patches(spec, em, x, first_axis, channel_axis)
    pieces = tap_slices(spec, em, x, first_axis)
    return pieces[0] if len(pieces) == 1 else em.op("Concat", pieces, "patches",
                                                    axis=channel_axis)


def _patch_bytes(spec: ConvSpec) -> float:
    """The patch matrix' size at 4 bytes a value; infinite when sizes are known only at run
    time."""
    out = spec.output_spatial()
    if None in out:
        return math.inf
    return 4 * spec.taps * spec.in_channels * math.prod(int(o) for o in out)


def _gather_rows(spec: ConvSpec, em: Emitter, pad_value: str | None) -> PatchRows:
    """Channels-last input, Pad, flatten the pixels, one Gather of whole C-rows."""
    g, k = spec.group, spec.taps * spec.in_per_group
    x, first_axis = _pixel_rows(spec, em, pad_value)
    index = sum_constants(em, index_parts(spec), "patch_index")
    patches = em.op("Gather", [x, index], "patches", axis=first_axis)
    out = [int(o) for o in spec.output_spatial()]  # patches: [N, (g,) out..., taps, C/g]
    shape = [0, *out, k] if g == 1 else [0, 0, int(np.prod(out)), k]
    rows = em.op("Reshape", [patches, em.ints("rows_shape", shape)], "patch_rows")
    return PatchRows(rows, rows)


def _pixel_rows(spec: ConvSpec, em: Emitter, pad_value: str | None) -> tuple[str, int]:
    """The padded input as channels-last pixel rows ``[N, (g,) pixels, C/g]``, and the
    pixel axis."""
    x, first_axis = _channels_last(spec, em)
    x = pad_input(spec, em, x, first_axis, pad_value)
    pixels = int(np.prod(spec.padded_spatial()))
    head = [0] * first_axis  # N, and g when grouped
    x = em.op("Reshape", [x, em.ints("pixels_shape", [*head, pixels, spec.in_per_group])],
              "flatten_pixels")
    return x, first_axis


def gemm_chunks(spec: ConvSpec, itemsize: int) -> range:
    """Starts of the runs of output rows that ``emit_patch_gemm`` gathers and multiplies one
    at a time: one run unless the conv is group 1 with Gather rows and over ``CHUNK_BYTES``
    of patches."""
    if spec.group > 1 or not uses_gather(spec):
        return range(1)
    return row_chunks(spec, spec.taps * spec.in_channels * itemsize, CHUNK_BYTES)


def _chunked_gemm(spec: ConvSpec, em: Emitter, chunks: list[tuple[int, int]], weight: str,
                  bias: str | None) -> None:
    """Group 1, static: per run of output rows a Gather of its patches, the MatMul and the
    bias Add (``_gemm``), then Concat of the runs."""
    k = spec.taps * spec.in_channels
    x, _ = _pixel_rows(spec, em, None)
    first, *rest = index_parts(spec)
    rest = sum_constants(em, rest, "patch_index_rest")
    out = [int(o) for o in spec.output_spatial()]
    pieces = []
    for i, (start, stop) in enumerate(chunks):
        index = sum_constants(em, [first[start:stop], rest], f"patch_index_{i}")
        patches = em.op("Gather", [x, index], f"patches_{i}", axis=1)
        rows = em.op("Reshape", [patches, em.ints(f"rows_shape_{stop - start}",
                                                  [0, stop - start, *out[1:], k])],
                     f"patch_rows_{i}")
        pieces.append(_gemm(spec, em, rows, weight, bias, (stop - start, *out[1:]),
                            f"_{i}"))
    y = em.op("Concat", pieces, "positions", axis=1)
    to_channels_first(spec, em, y, PatchRows(y, y))


def _channels_last(spec: ConvSpec, em: Emitter) -> tuple[str, int]:
    """``[N, sp..., C]`` (group 1) or ``[N, g, sp..., C/g]``, and its first spatial axis."""
    r, g = spec.rank, spec.group
    if g == 1:
        x = em.op("Transpose", [spec.input], "to_channels_last", perm=[0, *range(2, r + 2), 1])
        return x, 1
    # [N, g, C/g, sp...] -> [N, g, sp..., C/g]
    return em.op("Transpose", [_split_groups(spec, em)], "to_channels_last",
                 perm=[0, 1, *range(3, r + 3), 2]), 2


def _split_groups(spec: ConvSpec, em: Emitter) -> str:
    """``[N, C, sp...] -> [N, g, C/g, sp...]``."""
    shape = shape_target(em, "group_shape", [0, spec.group, spec.in_per_group],
                         spec.input_spatial, spec.input)
    return em.op("Reshape", [spec.input, shape], "split_groups")


def _flatten_groups(spec: ConvSpec, em: Emitter, patches: str) -> PatchRows:
    """Group 1: the patches are the rows. Grouped: ``[N, g, osp..., Kg] -> [N, g, L, Kg]``,
    ready for ``@ [g, Kg, Mg] -> [N, g, L, Mg]``."""
    if spec.group == 1:
        return PatchRows(patches, patches)
    k = spec.taps * spec.in_per_group
    flat = em.op("Reshape", [patches, _positions_shape(spec, em, patches, k)],
                 "flatten_positions")
    return PatchRows(flat, patches)


def to_channels_first(spec: ConvSpec, em: Emitter, y: str, rows: PatchRows,
                      group_bias: str | None = None) -> None:
    """GEMM result ``y`` (laid out like ``rows``, M/g per group last) -> ``spec.output``;
    grouped, plus ``group_bias`` (``[g, M/g, 1]``) once the channels are first."""
    r = spec.rank
    if spec.group == 1:
        em.op("Transpose", [y], "to_channels_first", output=spec.output,
              perm=[0, r + 1, *range(1, r + 1)])
        return
    y = em.op("Transpose", [y], "to_channels_first", perm=[0, 1, 3, 2])
    if group_bias is not None:
        y = em.op("Add", [y, group_bias], "AddBias")
    out_shape = shape_target(em, "out_shape", [0, spec.out_channels], spec.output_spatial(),
                             rows.grid)
    em.op("Reshape", [y, out_shape], "merge_groups", output=spec.output)


def _matmul_per_group(em: Emitter, flat: str, matrix: np.ndarray) -> str:
    """``[N, g, L, Kg] @ [g, Kg, Mg]`` as one MatMul per group with a 2-D ``[Kg, Mg]`` weight.

    ``--split-groups``: MatMul-only quantizers take 2-D weights only. Each group's patches
    are sliced out, multiplied, and the results concatenated back along the group axis.
    """
    axis = em.ints("group_axis", [1])
    results = []
    for i, block in enumerate(matrix):
        part = em.op("Slice", [flat, em.ints(f"group_{i}_start", [i]),
                               em.ints(f"group_{i}_end", [i + 1]), axis], f"group_{i}")
        results.append(em.op("MatMul", [part, em.const(f"weight_{i}", block)],
                             f"MatMul_group_{i}"))
    return em.op("Concat", results, "concat_groups", axis=1)


def _positions_shape(spec: ConvSpec, em: Emitter, patches: str, k: int) -> str:
    """``[0, 0, L, k]`` with ``L`` the number of output positions spelled out, not ``-1``:
    Reshape cannot resolve ``-1`` for an empty batch, which the Conv accepted."""
    out = spec.output_spatial()
    if None not in out:
        return em.ints("flat_shape", [0, 0, int(np.prod(out)), k])
    count = runtime_dims(em, patches, 2, 3)
    for axis in range(3, 2 + spec.rank):
        count = em.op("Mul", [count, runtime_dims(em, patches, axis, axis + 1)], "positions")
    return em.op("Concat", [em.ints("keep_batch_and_group", [0, 0]), count,
                            em.ints("patch_size", [k])], "flat_shape", axis=0)
