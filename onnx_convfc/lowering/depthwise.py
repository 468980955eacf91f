"""Depthwise convs (one input channel per group, any channel multiplier) without a GEMM.

A depthwise conv multiplies each tap by a per-channel scale: as a batched MatMul it is
``[C, L, taps] @ [C, taps, mult]``, thousands of tiny GEMMs, 7-65x slower than onnxruntime's
Conv (``docs/performance.md``). These exact forms emit no MatMul, so this lowering has its
own name in the report; ``auto`` leaves it out under ``--split-groups`` (``plan.GEMM_FREE``)
and for run-time weights (``families.py``), where im2col's per-group 2-D weights are what
quantizers take.

- **gather** (static spatial sizes, enough channels per pixel, or a strided or wide kernel):
  channels-last input, Pad, Reshape to ``[N, pixels, C]``, then per chunk of output rows a
  ``Gather`` of whole C-rows (int32 indices ``[rows, out..., taps]``, see
  ``taps.index_parts``), a ``Mul`` by the ``[taps, C]`` weight and a ``ReduceSum`` over the
  taps; Concat of the chunks, bias Add, Transpose back. Chunks of about ``CHUNK_BYTES`` keep
  the gathered patches in cache.
- **shift-add** (otherwise): one strided ``Slice`` per kernel offset of the padded input,
  each times its per-channel scale, summed by an Add chain. Static sizes run it channels-last
  (Transposes at both ends, which cancel against lowered neighbours' in onnxruntime) per
  run of output rows (``SHIFT_ADD_CHUNK_BYTES``), with the scales repeated along the
  output's last axis so that their broadcast runs are long; run-time sizes channels-first
  with no Transposes, up to ``taps.MAX_SLICE_TAPS`` taps (larger kernels are refused).

With a channel multiplier the input gets a unit axis that the weight broadcasts over:
channels-last ``[.., 1, C] * [.., mult, C]`` (so that each broadcast run is C values long,
not ``mult``: demo_cnn's 32->64 conv took 54 us in its Mul as ``[.., C, 1] * [.., C, mult]``),
and one small Transpose puts output channel ``c*mult + j`` in place; channels-first
``[N, C, 1, sp...] * [C, mult, 1...]``, which comes out in place.
"""

from __future__ import annotations

import math

import numpy as np

from ..conv import ConvSpec
from ..emit import Emitter
from .operands import Operand, Operands
from .taps import (
    MAX_SLICE_TAPS,
    index_parts,
    pad_input,
    row_chunks,
    runs,
    shape_target,
    slice_refusal,
    sum_constants,
    tap_slices,
    tap_tags,
)

# Gathered patches per chunk: 0.5-1 MiB measured fastest alone at 1 thread (5x5 C=192
# @40x40: 6.6x the Conv per chunk of 1 MiB vs 15.5x unchunked; 128 KiB chunks 8.0x); in whole
# models 2 MiB (with 1 MiB shift-add runs) ties at 1 thread and shares better between 2
# threads (PP-OCRv4 det 2.18x -> 2.05x, rec 2.08x -> 1.87x; 4 MiB / 2 MiB: 3 % worse at 1).
CHUNK_BYTES = 2 << 20
# Output per run of rows in the shift-add form, whose ~3 passes per tap then stay in cache.
# Measured (3x3, 1 thread): 16 @320x320 3.25x the Conv in 512 KiB runs vs 4.62x in one
# piece, 48 @160x160 3.67x vs 4.47x; 96 @80x80 4.53x vs 4.97x (256 KiB-1 MiB within 10 %).
SHIFT_ADD_CHUNK_BYTES = 1 << 20
# Output size (at 4 bytes a value) from which 3x3 depthwise convs take shift-add.
SHIFT_ADD_OUTPUT_BYTES = 1 << 20
# Largest set of per-tap scales repeated along the output's last axis (``_row_scales``).
TILED_SCALE_BYTES = 512 << 10
# ReduceSum takes its axes as an input from opset 13 on, as an attribute before.
REDUCE_AXES_INPUT_OPSET = 13


NAME = "depthwise"


def applies(spec: ConvSpec) -> str | None:
    if spec.group == 1 or spec.in_per_group != 1:
        return "not depthwise (needs one input channel per group)"
    return slice_refusal(spec)


def emit(spec: ConvSpec, weight: np.ndarray, bias: Operand | None, em: Emitter) -> None:
    if uses_gather(spec) and em.opset is not None:  # ReduceSum's signature needs the opset
        _gather_form(spec, weight, bias, em)
    elif spec.is_static:
        _rows_shift_add_form(spec, weight, bias, em)
    else:
        _shift_add_form(spec, weight, bias, em)


def uses_gather(spec: ConvSpec) -> bool:
    """The gather form, where it pays. Measured (1 thread): shift-add wins below 32 channels
    and for 3x3 stride 1 below 128 channels (64 @56x56: 4.8x vs 6.4x); gather wins with a
    stride (128 @56x56 s2: 3.7x vs 6.0x), 5x5 kernels (48 @80x80: 9.9x vs 11.9x) and many
    channels (256 @14x14: 4.3x vs 6.8x). Since shift-add runs per run of rows, channels-last,
    it wins back 3x3 kernels over large maps (at least ``SHIFT_ADD_OUTPUT_BYTES`` of output,
    whole models at 1 thread: PP-OCRv4 det 1.73x -> 1.68x, rec and cls within noise). Over
    ``MAX_SLICE_TAPS`` taps, static sizes always take it (shift-add emits nodes per tap)."""
    if not spec.is_static:
        return False
    if spec.taps > MAX_SLICE_TAPS:
        return True
    if spec.in_channels < 32:
        return False
    if spec.taps <= 9 and _output_elements(spec) * 4 >= SHIFT_ADD_OUTPUT_BYTES:
        return False
    return spec.in_channels >= 128 or spec.taps > 9 or any(s > 1 for s in spec.strides)


def _output_elements(spec: ConvSpec) -> int:
    return spec.out_channels * math.prod(int(o) for o in spec.output_spatial())


def chunks(spec: ConvSpec, itemsize: int) -> tuple[range, range | None]:
    """Starts of the runs of output rows per Gather (``taps.row_chunks``), and ``None``; or,
    when one output row of patches is over ``CHUNK_BYTES`` (wide maps, many channels), every
    row and the starts of the runs of output columns per Gather."""
    per_position = spec.taps * spec.out_channels * itemsize
    out = [int(o) for o in spec.output_spatial()]
    if spec.rank == 1 or math.prod(out[1:]) * per_position <= CHUNK_BYTES:
        return row_chunks(spec, per_position, CHUNK_BYTES), None
    columns = max(1, CHUNK_BYTES // (math.prod(out[2:]) * per_position))
    return range(out[0]), range(0, out[1], columns)


def chunk_count(spec: ConvSpec, itemsize: int) -> int:
    rows, columns = chunks(spec, itemsize)
    return len(rows) * (1 if columns is None else len(columns))


def _tap_scales(spec: ConvSpec, weight: np.ndarray) -> np.ndarray:
    """``[taps, C, mult]`` (``[taps, C]`` without a multiplier): the scale of input channel
    ``c`` for output ``c*mult + j``."""
    mult = spec.out_channels // spec.in_channels
    scales = np.ascontiguousarray(weight.reshape(spec.in_channels, mult, spec.taps)
                                  .transpose(2, 0, 1))
    return scales if mult > 1 else scales[:, :, 0]


def _channels_last_scales(spec: ConvSpec, weight: np.ndarray) -> np.ndarray:
    """``[taps, mult, C]`` (``[taps, C]`` without a multiplier): channels innermost."""
    mult = spec.out_channels // spec.in_channels
    scales = weight.reshape(spec.in_channels, mult, spec.taps).transpose(2, 1, 0)
    return np.ascontiguousarray(scales if mult > 1 else scales[:, 0])


def _gather_form(spec: ConvSpec, weight: np.ndarray, bias: Operand | None,
                 em: Emitter) -> None:
    r, c, m = spec.rank, spec.in_channels, spec.out_channels
    mult = m // c
    x = _padded_channels_last(spec, em)
    pixels = int(np.prod(spec.padded_spatial()))
    unit = [1] if mult > 1 else []
    x = em.op("Reshape", [x, em.ints("pixels_shape", [0, pixels, *unit, c])], "flatten_pixels")
    rows, columns = chunks(spec, weight.dtype.itemsize)
    scales = _channels_last_scales(spec, weight)
    if columns is None:  # [W, taps, (mult,) C] (whole models: det 1.82x -> 1.70x, with shift-add's)
        scales = _row_scales(spec, scales, axis=0)
    scales = em.const("tap_scales", scales)
    parts = index_parts(spec)
    rest = sum_constants(em, parts[1 if columns is None else 2:], "patch_index_rest")
    column_runs = [None] if columns is None else runs(columns)
    sums = []
    for i, (start, stop) in enumerate(runs(rows)):
        lead = [parts[0][start:stop]]
        pieces = []
        for j, cols in enumerate(column_runs):
            tag = f"{i}" if cols is None else f"{i}_{j}"
            head = lead if cols is None else lead + [parts[1][:, cols[0]:cols[1]]]
            index = sum_constants(em, [*head, rest], f"patch_index_{tag}")
            patches = em.op("Gather", [x, index], f"patches_{tag}", axis=1)  # [N, o.., taps, C]
            terms = em.op("Mul", [patches, scales], f"scale_{tag}")
            pieces.append(_reduce_sum(em, terms, 1 + r, f"sum_taps_{tag}"))  # [N, o.., C(, m)]
        sums.append(pieces[0] if len(pieces) == 1 else
                    em.op("Concat", pieces, f"columns_{i}", axis=2))
    _channels_first(spec, em, sums[0] if len(sums) == 1 else
                    em.op("Concat", sums, "positions", axis=1), bias)


def _padded_channels_last(spec: ConvSpec, em: Emitter) -> str:
    """``[N, C, sp...]`` -> padded ``[N, sp..., C]``."""
    r = spec.rank
    x = em.op("Transpose", [spec.input], "to_channels_last", perm=[0, *range(2, r + 2), 1])
    return pad_input(spec, em, x, 1)


def _channels_first(spec: ConvSpec, em: Emitter, y: str, bias: Operand | None) -> None:
    """Channels-last ``y`` (``[N, out..., mult, C]`` with a multiplier) plus the bias, as
    ``spec.output`` ``[N, M, out...]``."""
    r, m = spec.rank, spec.out_channels
    if m != spec.in_channels:
        out = [int(o) for o in spec.output_spatial()]
        y = em.op("Transpose", [y], "channel_major", perm=[*range(r + 1), r + 2, r + 1])
        y = em.op("Reshape", [y, em.ints("out_shape", [0, *out, m])], "merge_multiplier")
    if bias is not None:
        y = em.op("Add", [y, Operands(em).name(bias, "bias")], "AddBias")
    em.op("Transpose", [y], "to_channels_first", output=spec.output,
          perm=[0, r + 1, *range(1, r + 1)])


def _reduce_sum(em: Emitter, x: str, axis: int, what: str) -> str:
    if em.opset >= REDUCE_AXES_INPUT_OPSET:
        return em.op("ReduceSum", [x, em.ints("tap_axis", [axis])], what, keepdims=0)
    return em.op("ReduceSum", [x], what, axes=[axis], keepdims=0)


def _shift_add_form(spec: ConvSpec, weight: np.ndarray, bias: Operand | None,
                    em: Emitter) -> None:
    """Channels-first, for run-time sizes: Pad, a Slice per tap, Mul, Add chain."""
    r, c, m = spec.rank, spec.in_channels, spec.out_channels
    mult = m // c
    x, first_axis = spec.input, 2
    if mult > 1:  # [N, C, sp...] -> [N, C, 1, sp...]
        shape = shape_target(em, "unit_shape", [0, c, 1], spec.input_spatial, x)
        x, first_axis = em.op("Reshape", [x, shape], "add_multiplier_axis"), 3
    x = pad_input(spec, em, x, first_axis, channels_last=False)
    per_channel = (c, mult) if mult > 1 else (c,)
    scales = _tap_scales(spec, weight).reshape(spec.taps, *per_channel, *[1] * r)
    merge = mult > 1
    y = _shift_add(spec, em, x, first_axis, _scale_constants(spec, em, scales),
                   spec.output if bias is None and not merge else None, "")
    if bias is not None:
        ops = Operands(em)
        bias = ops.reshape(bias, (*per_channel, *[1] * r), "bias_per_channel")
        y = em.op("Add", [y, ops.name(bias, "bias")], "AddBias",
                  output=None if merge else spec.output)
    if merge:  # [N, C, mult, osp...] -> [N, M, osp...]
        shape = shape_target(em, "out_shape", [0, m], spec.output_spatial(), y, start=3)
        em.op("Reshape", [y, shape], "merge_multiplier", output=spec.output)


def _rows_shift_add_form(spec: ConvSpec, weight: np.ndarray, bias: Operand | None,
                         em: Emitter) -> None:
    """Channels-last, static sizes: Transpose, Pad, then per run of output rows a Slice of
    the rows it reads, a Slice per tap, Mul by the tap's row of scales, Add chain; Concat,
    bias Add, Transpose back."""
    c, m = spec.in_channels, spec.out_channels
    x = _padded_channels_last(spec, em)
    if m != c:  # [N, sp..., C] -> [N, sp..., 1, C]
        padded = [int(p) for p in spec.padded_spatial()]
        x = em.op("Reshape", [x, em.ints("unit_shape", [0, *padded, 1, c])],
                  "add_multiplier_axis")
    scales = _row_scales(spec, _channels_last_scales(spec, weight), axis=1)
    scales = _scale_constants(spec, em, scales)
    starts = shift_add_chunks(spec, weight.dtype.itemsize)
    sums = []
    for i, (start, stop) in enumerate(runs(starts)):
        rows = _input_rows(spec, em, x, 1, start, stop, i) if len(starts) > 1 else x
        sums.append(_shift_add(spec, em, rows, 1, scales, None,
                               f"_{i}" if len(starts) > 1 else ""))
    _channels_first(spec, em, sums[0] if len(sums) == 1 else
                    em.op("Concat", sums, "rows", axis=1), bias)


def shift_add_chunks(spec: ConvSpec, itemsize: int) -> range:
    """Starts of the runs of output rows the shift-add form sums one at a time (static sizes;
    one run otherwise): about ``SHIFT_ADD_CHUNK_BYTES`` of output each."""
    if not spec.is_static:
        return range(1)
    return row_chunks(spec, spec.out_channels * itemsize, SHIFT_ADD_CHUNK_BYTES)


def _row_scales(spec: ConvSpec, scales: np.ndarray, axis: int) -> np.ndarray:
    """``[taps, (mult,) C]`` scales repeated along the output's last axis, a new ``axis``
    (``[taps, W, C]`` for shift-add, ``[W, taps, C]`` for the Gather form), unless that takes
    over ``TILED_SCALE_BYTES``: onnxruntime broadcasts a channels-last ``[C]`` scale in runs
    of C values (16 @320x320: 1.2 ms a Mul, 0.48 ms in runs of ``W*C``). Never in 1-D, where
    the width is the axis cut into runs of rows."""
    width = int(spec.output_spatial()[-1])
    if spec.rank == 1 or scales.size * width * scales.itemsize > TILED_SCALE_BYTES:
        return scales
    return np.ascontiguousarray(np.repeat(np.expand_dims(scales, axis), width, axis=axis))


def _input_rows(spec: ConvSpec, em: Emitter, x: str, first_axis: int, start: int, stop: int,
                i: int) -> str:
    """The rows of the padded ``x`` that output rows ``start..stop`` read."""
    step = spec.strides[0]
    end = (stop - 1) * step + spec.spans[0]
    return em.op("Slice", [x, em.ints(f"rows_start_{i}", [start * step]),
                           em.ints(f"rows_end_{i}", [end]), em.ints("row_axis", [first_axis])],
                 f"rows_{i}")


def _scale_constants(spec: ConvSpec, em: Emitter, scales: np.ndarray
                     ) -> list[tuple[str, str]]:
    """Each tap's tag (``taps.tap_tags``) and its scales as a constant, stored once for every
    run of rows that reads it."""
    return [(tag, em.const(f"scale_{tag}", tap)) for tag, tap in zip(tap_tags(spec), scales)]


def _shift_add(spec: ConvSpec, em: Emitter, x: str, first_axis: int,
               scales: list[tuple[str, str]], output: str | None, suffix: str) -> str:
    """Sum over the kernel offsets of each offset's strided Slice of ``x`` times its
    per-channel scale (``scales``: each tap's tag and constant, from ``_scale_constants``)."""
    y = None
    pieces = tap_slices(spec, em, x, first_axis, suffix)
    for tap, (piece, (tag, scale)) in enumerate(zip(pieces, scales)):
        out = output if tap == spec.taps - 1 else None
        if y is None:
            y = em.op("Mul", [piece, scale], f"scale_{tag}{suffix}", output=out)
        else:
            term = em.op("Mul", [piece, scale], f"scale_{tag}{suffix}")
            y = em.op("Add", [y, term], f"sum_{tag}{suffix}", output=out)
    return y


