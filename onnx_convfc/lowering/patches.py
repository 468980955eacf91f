"""Channels-last patch extraction followed by one GEMM: the body of ``im2col`` and ``pointwise``.

The input is turned channels-last once (``[N, spatial..., C]``, or ``[N, g, spatial..., C/g]``
for grouped convs), padded, and cut into one strided ``Slice`` per kernel offset. Slice ends
are negative offsets from the end, so the graph stays valid for any run-time spatial size.
The slices are concatenated along channels and multiplied by the precomputed weight ``B``.
A pointwise conv is the case with a single offset, where no Concat is needed.

``patch_rows`` and ``to_channels_first`` are the two halves around the GEMM, shared with the
integer lowerings (which pad with the input zero point and multiply with MatMulInteger).
The weight and bias may be tensors computed at run time; their layout is then built by
nodes in the graph (``operands.patch_matrix``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..conv import ConvSpec
from ..emit import Emitter
from .operands import Operand, Operands, is_runtime, patch_matrix

INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class PatchRows:
    """Patches ready for a GEMM over their last axis, and what restores ``[N, M, out...]``.

    ``rows`` is ``[N, out..., taps*C]`` (group 1) or ``[N, g, L, taps*C/g]`` (grouped, the
    ``L`` output positions flattened); ``grid`` is the unflattened patches.
    """

    rows: str
    grid: str


def emit_patch_gemm(spec: ConvSpec, weight: Operand, bias: Operand | None,
                    em: Emitter) -> None:
    g = spec.group
    rows = patch_rows(spec, em)
    ops = Operands(em)
    matrix = patch_matrix(ops, weight, g)
    if g > 1 and em.options.split_groups and not is_runtime(matrix):
        y = _matmul_per_group(em, rows.rows, matrix)
    else:
        y = em.op("MatMul", [rows.rows, ops.name(matrix, "weight")])
    if bias is not None:
        if g > 1:
            bias = ops.reshape(bias, (g, 1, spec.out_per_group), "bias_per_group")
        y = em.op("Add", [y, ops.name(bias, "bias")], "AddBias")
    to_channels_first(spec, em, y, rows)


def patch_rows(spec: ConvSpec, em: Emitter, pad_value: str | None = None) -> PatchRows:
    """Channels-last patches of ``spec.input``; padding holds ``pad_value`` (a scalar tensor)
    instead of zeros when given."""
    r, g = spec.rank, spec.group
    if g == 1:
        x = em.op("Transpose", [spec.input], "to_channels_last", perm=[0, *range(2, r + 2), 1])
        first_axis = 1
    else:
        # [N, C, sp...] -> [N, g, C/g, sp...] -> [N, g, sp..., C/g]
        shape = _shape(em, "group_shape", [0, g, spec.in_per_group], spec.input_spatial,
                       spec.input)
        x = em.op("Reshape", [spec.input, shape], "split_groups")
        x = em.op("Transpose", [x], "to_channels_last", perm=[0, 1, *range(3, r + 3), 2])
        first_axis = 2
    x = _pad(spec, em, x, first_axis, pad_value)
    patches = _slices(spec, em, x, first_axis)
    if g == 1:
        return PatchRows(patches, patches)
    # [N, g, osp..., Kg] -> [N, g, L, Kg], ready for @ [g, Kg, Mg] -> [N, g, L, Mg]
    k = spec.taps * spec.in_per_group
    flat = em.op("Reshape", [patches, _positions_shape(spec, em, patches, k)],
                 "flatten_positions")
    return PatchRows(flat, patches)


def to_channels_first(spec: ConvSpec, em: Emitter, y: str, rows: PatchRows) -> None:
    """GEMM result ``y`` (laid out like ``rows``, M/g per group last) -> ``spec.output``."""
    r = spec.rank
    if spec.group == 1:
        em.op("Transpose", [y], "to_channels_first", output=spec.output,
              perm=[0, r + 1, *range(1, r + 1)])
        return
    y = em.op("Transpose", [y], "to_channels_first", perm=[0, 1, 3, 2])
    out_shape = _shape(em, "out_shape", [0, spec.out_channels], spec.output_spatial(),
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


def _shape(em: Emitter, what: str, head: list[int], spatial: tuple[int | None, ...],
           tensor: str) -> str:
    """``head + spatial`` as a Reshape target: a constant when ``spatial`` is static, else
    ``spatial`` is read from ``shape(tensor)[2:]`` at run time. The constant also keeps
    onnxruntime's Reshape fusion from turning the run-time shape into one with ``-1``, which
    an empty batch cannot resolve."""
    if None not in spatial:
        return em.ints(what, [*head, *spatial])
    return em.op("Concat", [em.ints(f"{what}_head", head),
                            _dims(em, tensor, 2, 2 + len(spatial))], what, axis=0)


def _positions_shape(spec: ConvSpec, em: Emitter, patches: str, k: int) -> str:
    """``[0, 0, L, k]`` with ``L`` the number of output positions spelled out, not ``-1``:
    Reshape cannot resolve ``-1`` for an empty batch, which the Conv accepted."""
    out = spec.output_spatial()
    if None not in out:
        return em.ints("flat_shape", [0, 0, int(np.prod(out)), k])
    count = _dims(em, patches, 2, 3)
    for axis in range(3, 2 + spec.rank):
        count = em.op("Mul", [count, _dims(em, patches, axis, axis + 1)], "positions")
    return em.op("Concat", [em.ints("keep_batch_and_group", [0, 0]), count,
                            em.ints("patch_size", [k])], "flat_shape", axis=0)


def _dims(em: Emitter, tensor: str, start: int, end: int) -> str:
    """1-D int64 tensor with ``shape(tensor)[start:end]``, taken at run time."""
    shape = em.op("Shape", [tensor], "shape")
    return em.op("Slice", [shape, em.ints("dims_start", [start]), em.ints("dims_end", [end])],
                 "dims")


def _pad(spec: ConvSpec, em: Emitter, x: str, first_axis: int, value: str | None) -> str:
    r = spec.rank
    lead, trail = [0] * first_axis, [0]
    fill = [value] if value else []
    if spec.pads is not None:
        if not any(spec.pads):
            return x
        pads = lead + list(spec.pads[:r]) + trail + lead + list(spec.pads[r:]) + trail
        return em.op("Pad", [x, em.ints("pads", pads), *fill])
    return em.op("Pad", [x, _same_pads(spec, em, x, first_axis), *fill])


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
