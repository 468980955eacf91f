"""Channels-last patch extraction followed by one GEMM: the body of ``im2col`` and ``pointwise``.

The input is turned channels-last once (``[N, spatial..., C]``, or ``[N, g, spatial..., C/g]``
for grouped convs), padded, and cut into one strided ``Slice`` per kernel offset. Slice ends
are negative offsets from the end, so the graph stays valid for any run-time spatial size.
The slices are concatenated along channels and multiplied by the precomputed weight ``B``.
A pointwise conv is the case with a single offset, where no Concat is needed.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..conv import ConvSpec
from ..emit import Emitter
from .weights import patch_weight

INT64_MAX = np.iinfo(np.int64).max


def emit_patch_gemm(spec: ConvSpec, weight: np.ndarray, bias: np.ndarray | None,
                    em: Emitter) -> None:
    r, g = spec.rank, spec.group
    if g == 1:
        x = em.op("Transpose", [spec.input], "to_channels_last", perm=[0, *range(2, r + 2), 1])
        first_axis = 1
    else:
        # [N, C, sp...] -> [N, g, C/g, sp...] -> [N, g, sp..., C/g]
        shape = em.op("Concat", [em.ints("group_dims", [0, g, spec.in_per_group]),
                                 _dims(em, spec.input, 2, 2 + r)], "group_shape", axis=0)
        x = em.op("Reshape", [spec.input, shape], "split_groups")
        x = em.op("Transpose", [x], "to_channels_last", perm=[0, 1, *range(3, r + 3), 2])
        first_axis = 2
    x = _pad(spec, em, x, first_axis)
    patches = _slices(spec, em, x, first_axis)

    matrix = patch_weight(weight, g)
    if g == 1:
        y = em.op("MatMul", [patches, em.const("weight", matrix)])
        if bias is not None:
            y = em.op("Add", [y, em.const("bias", bias)], "AddBias")
        em.op("Transpose", [y], "to_channels_first", output=spec.output,
              perm=[0, r + 1, *range(1, r + 1)])
        return
    # [N, g, osp..., Kg] -> [N, g, L, Kg] @ [g, Kg, Mg] -> [N, g, L, Mg]
    flat = em.op("Reshape", [patches, em.ints("flat_shape", [0, 0, -1, matrix.shape[1]])],
                 "flatten_positions")
    y = em.op("MatMul", [flat, em.const("weight", matrix)])
    if bias is not None:
        y = em.op("Add", [y, em.const("bias", bias.reshape(g, 1, -1))], "AddBias")
    y = em.op("Transpose", [y], "to_channels_first", perm=[0, 1, 3, 2])
    out_shape = em.op("Concat", [em.ints("out_channels", [0, spec.out_channels]),
                                 _dims(em, patches, 2, 2 + r)], "out_shape", axis=0)
    em.op("Reshape", [y, out_shape], "merge_groups", output=spec.output)


def _dims(em: Emitter, tensor: str, start: int, end: int) -> str:
    """1-D int64 tensor with ``shape(tensor)[start:end]``, taken at run time."""
    shape = em.op("Shape", [tensor], "shape")
    return em.op("Slice", [shape, em.ints("dims_start", [start]), em.ints("dims_end", [end])],
                 "dims")


def _pad(spec: ConvSpec, em: Emitter, x: str, first_axis: int) -> str:
    r = spec.rank
    lead, trail = [0] * first_axis, [0]
    if spec.pads is not None:
        if not any(spec.pads):
            return x
        pads = lead + list(spec.pads[:r]) + trail + lead + list(spec.pads[r:]) + trail
        return em.op("Pad", [x, em.ints("pads", pads)])
    return em.op("Pad", [x, _same_pads(spec, em, x, first_axis)])


def _same_pads(spec: ConvSpec, em: Emitter, x: str, first_axis: int) -> str:
    """Run-time pads of ``auto_pad=SAME_*`` when a strided axis has an unknown size.

    total = max(0, (ceil(size / s) - 1) * s + (k - 1) * d + 1 - size), split as the spec says.
    """
    r = spec.rank
    size = _dims(em, x, first_axis, first_axis + r)
    strides = em.ints("strides", spec.strides)
    out = em.op("Div", [em.op("Add", [size, em.ints("strides_minus_1",
                                                    [s - 1 for s in spec.strides])]), strides])
    span = em.op("Add", [em.op("Mul", [em.op("Sub", [out, em.ints("one", [1])]), strides]),
                         em.ints("span", [e + 1 for e in spec.extents])])
    total = em.op("Sub", [span, size])
    total = em.op("Div", [em.op("Add", [total, em.op("Abs", [total])]), em.ints("two", [2])],
                  "clamp_at_zero")
    half = em.op("Div", [total, em.ints("two", [2])])
    rest = em.op("Sub", [total, half])
    begin, end = (half, rest) if spec.auto_pad == "SAME_UPPER" else (rest, half)
    lead = em.ints("pads_lead", [0] * first_axis)
    trail = em.ints("pads_trail", [0])
    return em.op("Concat", [lead, begin, trail, lead, end, trail], "same_pads", axis=0)


def _slices(spec: ConvSpec, em: Emitter, x: str, first_axis: int) -> str:
    r = spec.rank
    axes = em.ints("spatial_axes", list(range(first_axis, first_axis + r)))
    steps = em.ints("strides", spec.strides)
    pieces = []
    for offset in itertools.product(*(range(k) for k in spec.kernel)):
        starts = [o * d for o, d in zip(offset, spec.dilations)]
        ends = [b - e if e > b else INT64_MAX for b, e in zip(starts, spec.extents)]
        whole = not any(starts) and all(e == INT64_MAX for e in ends)
        if whole and all(s == 1 for s in spec.strides):
            pieces.append(x)
            continue
        tag = "x".join(str(o) for o in offset)
        pieces.append(em.op("Slice", [x, em.ints(f"starts_{tag}", starts),
                                      em.ints(f"ends_{tag}", ends), axes, steps], f"tap_{tag}"))
    if len(pieces) == 1:
        return pieces[0]
    return em.op("Concat", pieces, "patches", axis=-1)
