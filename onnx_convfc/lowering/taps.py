"""Where each kernel offset of a conv reads: padding, one Slice per offset, Gather indices.

The building blocks shared by the patch (GEMM) and depthwise forms. Slices work for any
run-time spatial size; Gather indices need static sizes. Run-time shapes are read with
``Shape`` + ``Slice`` so that an empty batch, which Conv accepts, still reshapes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from ..conv import ConvSpec
from ..emit import Emitter

INT64_MAX = np.iinfo(np.int64).max
# Most kernel taps a form may emit one node (a Slice, a Mul and an Add) for. Measured: a
# 300x300 kernel with run-time sizes took 90k Slices, 3-5 s, a 31-76 MB graph and 570-720 MB
# of memory to rewrite. Static sizes take a Gather instead, whatever the kernel.
MAX_SLICE_TAPS = 4096
TOO_MANY_TAPS = (f"kernel over {MAX_SLICE_TAPS} taps with a spatial size known only at run "
                 "time (one Slice per tap); fix it with --input-shape")


def slice_refusal(spec: ConvSpec) -> str | None:
    """Why no Slice form is built: over ``MAX_SLICE_TAPS`` taps with sizes known only at run
    time (static sizes take a Gather instead); ``None`` otherwise."""
    return TOO_MANY_TAPS if spec.taps > MAX_SLICE_TAPS and not spec.is_static else None


def pad_input(spec: ConvSpec, em: Emitter, x: str, first_axis: int, value: str | None = None,
              channels_last: bool = True) -> str:
    """Pad the spatial axes ``first_axis..`` of ``x`` (followed by a channel axis when
    ``channels_last``) as the conv does; with ``value`` instead of zeros when given."""
    r = spec.rank
    lead, trail = [0] * first_axis, [0] * channels_last
    fill = [value] if value else []
    if spec.pads is not None:
        if not any(spec.pads):
            return x
        pads = lead + list(spec.pads[:r]) + trail + lead + list(spec.pads[r:]) + trail
        return em.op("Pad", [x, em.ints("pads", pads), *fill])
    return em.op("Pad", [x, _same_pads(spec, em, x, first_axis, trail), *fill])


def _same_pads(spec: ConvSpec, em: Emitter, x: str, first_axis: int, trail: list[int]) -> str:
    """Run-time pads of ``auto_pad=SAME_*`` when a strided axis has an unknown size.

    total = max(0, (ceil(size / s) - 1) * s + (k - 1) * d + 1 - size), split as the spec says.
    """
    r = spec.rank
    size = runtime_dims(em, x, first_axis, first_axis + r)
    strides = em.ints("strides", spec.strides)
    out = em.op("Div", [em.op("Add", [size, em.ints("strides_minus_1",
                                                    [s - 1 for s in spec.strides])]), strides])
    span = em.op("Add", [em.op("Mul", [em.op("Sub", [out, em.ints("one", [1])]), strides]),
                         em.ints("span", list(spec.spans))])
    total = em.op("Sub", [span, size])
    total = em.op("Div", [em.op("Add", [total, em.op("Abs", [total])]), em.ints("two", [2])],
                  "clamp_at_zero")
    half = em.op("Div", [total, em.ints("two", [2])])
    rest = em.op("Sub", [total, half])
    begin, end = (half, rest) if spec.auto_pad == "SAME_UPPER" else (rest, half)
    lead = em.ints("pads_lead", [0] * first_axis)
    tail = [em.ints("pads_trail", trail)] if trail else []
    return em.op("Concat", [lead, begin, *tail, lead, end, *tail], "same_pads", axis=0)


def tap_tags(spec: ConvSpec) -> list[str]:
    """Each kernel offset (row-major) as ``"0x2"``, for node and constant names."""
    return ["x".join(map(str, o)) for o in itertools.product(*map(range, spec.kernel))]


def tap_slices(spec: ConvSpec, em: Emitter, x: str, first_axis: int,
               suffix: str = "") -> list[str]:
    """One strided Slice of the padded ``x`` per kernel offset (row-major), over the spatial
    axes ``first_axis..``; ends count from the end, so any run-time size works (and so does
    a run of rows of the padded input). ``suffix`` ends the node names."""
    r = spec.rank
    pieces, axes, steps = [], None, None
    offsets = itertools.product(*(range(k) for k in spec.kernel))
    for offset, tag in zip(offsets, tap_tags(spec)):
        starts = [o * d for o, d in zip(offset, spec.dilations)]
        ends = [b - e if e > b else INT64_MAX for b, e in zip(starts, spec.extents)]
        whole = not any(starts) and all(e == INT64_MAX for e in ends)
        if whole and all(s == 1 for s in spec.strides):
            pieces.append(x)
            continue
        if axes is None:  # emitted only when a Slice reads them
            axes = em.ints("spatial_axes", list(range(first_axis, first_axis + r)))
            steps = em.ints("strides", spec.strides)
        pieces.append(em.op("Slice", [x, em.ints(f"starts_{tag}", starts),
                                      em.ints(f"ends_{tag}", ends), axes, steps],
                             f"tap_{tag}{suffix}"))
    return pieces


def axis_by_axis_patches(spec: ConvSpec, em: Emitter, x: str, first_axis: int,
                         channel_axis: int) -> str:
    """The patches of the padded ``x``, one spatial axis at a time: from the last spatial
    axis to the first, one strided Slice per kernel offset along that axis, concatenated on
    ``channel_axis``. The channels come out ordered (offset along axis 0, ..., along axis
    r-1, channel), as with one Slice per tap, from ``sum(kernel)`` Slices instead of
    ``prod(kernel)`` (MNIST's 5x5 convs: 10 instead of 25)."""
    for d in reversed(range(spec.rank)):
        axis, k = first_axis + d, spec.kernel[d]
        if k == 1 and spec.strides[d] == 1:
            continue
        pieces, axis_step = [], None
        for o in range(k):
            start = o * spec.dilations[d]
            end = start - spec.extents[d] if spec.extents[d] > start else INT64_MAX
            bounds = [em.ints(f"start_{o}", [start]), em.ints(f"end_{o}", [end])]
            if axis_step is None:  # after the first bounds, so constants keep their order
                axis_step = [em.ints(f"axis_{axis}", [axis]),
                             em.ints(f"step_{spec.strides[d]}", [spec.strides[d]])]
            pieces.append(em.op("Slice", [x, *bounds, *axis_step], f"axis{d}_tap_{o}"))
        x = pieces[0] if k == 1 else em.op("Concat", pieces, f"axis{d}_taps", axis=channel_axis)
    return x


def index_parts(spec: ConvSpec) -> list[np.ndarray]:
    """Where each (output position, kernel offset) reads the flattened padded input, in parts.

    The position is the sum of these ``r + 1`` arrays broadcast to ``[o_1, ..., o_r, taps]``:
    one per output axis (``o_d * stride_d`` times the axis' flat stride), then the offsets of
    the taps in row-major order. Stored in parts, an index costs ``sum(o_d) + taps`` numbers
    instead of ``L * taps`` (megabytes for large maps); onnxruntime folds the Adds once per
    session. int32 unless the padded input is too large. Static ``spec`` only.
    """
    padded, out = spec.padded_spatial(), spec.output_spatial()
    r = spec.rank
    flat_strides = [int(np.prod(padded[d + 1:], dtype=np.int64)) for d in range(r)]
    small = int(np.prod(padded, dtype=np.int64)) <= np.iinfo(np.int32).max
    dtype = np.int32 if small else np.int64
    parts = []
    for d in range(r):
        shape = [1] * (r + 1)
        shape[d] = out[d]
        start = np.arange(out[d], dtype=np.int64) * spec.strides[d] * flat_strides[d]
        parts.append(start.reshape(shape).astype(dtype))
    offsets = np.zeros((), dtype=np.int64)
    for d in range(r):
        step = spec.dilations[d] * flat_strides[d]
        offsets = offsets[..., None] + np.arange(spec.kernel[d], dtype=np.int64) * step
    parts.append(offsets.reshape([1] * r + [spec.taps]).astype(dtype))
    return parts


def row_chunks(spec: ConvSpec, bytes_per_position: int, chunk_bytes: int) -> range:
    """Starts of the runs of the first output axis whose gathered patches
    (``bytes_per_position`` each) fill about ``chunk_bytes``, so that they are still in cache
    when the next op reads them; a run ends where the next starts, the last at the axis'
    end. A ``range``: its length is known before any run is built. Static ``spec`` only."""
    out = [int(o) for o in spec.output_spatial()]
    per_row = int(np.prod(out[1:], dtype=np.int64)) * bytes_per_position
    return range(0, out[0], max(1, chunk_bytes // max(1, per_row)))


def runs(starts: range) -> list[tuple[int, int]]:
    """``row_chunks`` as ``(start, stop)`` pairs."""
    return [(start, min(start + starts.step, starts.stop)) for start in starts]


def sum_constants(em: Emitter, parts: list[np.ndarray | str], what: str) -> str:
    """Emit the broadcast sum of ``parts`` (arrays, or names of tensors already emitted)."""
    names = [p if isinstance(p, str) else em.const(f"{what}_part{i}", p)
             for i, p in enumerate(parts)]
    total = names[0]
    for i, name in enumerate(names[1:], 1):
        total = em.op("Add", [total, name], f"{what}_{i}")
    return total


def shape_target(em: Emitter, what: str, head: list[int], spatial: tuple[int | None, ...],
                 tensor: str, start: int = 2, tail: Sequence[int] = (),
                 scale: Sequence[int] | None = None) -> str:
    """``head + spatial + tail`` as a Reshape target: a constant when ``spatial`` is static,
    else ``spatial`` is read from ``shape(tensor)[start:]`` (times ``scale``) at run time.
    The constant also keeps onnxruntime's Reshape fusion from turning the run-time shape into
    one with ``-1``, which an empty batch cannot resolve."""
    if None not in spatial:
        return em.ints(what, [*head, *spatial, *tail])
    spatial_dims = runtime_dims(em, tensor, start, start + len(spatial))
    if scale is not None:
        spatial_dims = em.op("Mul", [spatial_dims, em.ints(f"{what}_scale", scale)],
                             f"{what}_scaled")
    parts = [em.ints(f"{what}_head", head), spatial_dims]
    if tail:
        parts.append(em.ints(f"{what}_tail", tail))
    return em.op("Concat", parts, what, axis=0)


def runtime_dims(em: Emitter, tensor: str, start: int, end: int) -> str:
    """1-D int64 tensor with ``shape(tensor)[start:end]``, taken at run time."""
    shape = em.op("Shape", [tensor], "shape")
    return em.op("Slice", [shape, em.ints("dims_start", [start]), em.ints("dims_end", [end])],
                 "dims")
