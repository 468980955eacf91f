"""Precomputed weights of the lowered forms: pure numpy, no ONNX.

Conv weights arrive as ``[M, C/group, k1, ..., kr]``. Each function returns the matrix
``B`` of ``y = x @ B`` for one lowering; the tests check them against a direct convolution.
"""

from __future__ import annotations

import numpy as np

from ..conv import ConvSpec


def patch_weight(weight: np.ndarray, group: int) -> np.ndarray:
    """Weight for channels-last patches ordered (kernel offset, channel).

    Returns ``[taps * C, M]`` for ``group == 1`` and ``[group, taps * C/g, M/g]`` otherwise,
    matching patches that concatenate one ``[..., C/g]`` slice per kernel offset.
    """
    m, c_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    rank = len(kernel)
    taps = int(np.prod(kernel, dtype=np.int64))
    grouped = weight.reshape((group, m // group, c_per_group) + kernel)
    # (g, Mg, Cg, k...) -> (g, k..., Cg, Mg)
    order = (0,) + tuple(range(3, 3 + rank)) + (2, 1)
    matrix = grouped.transpose(order).reshape(group, taps * c_per_group, m // group)
    matrix = np.ascontiguousarray(matrix)
    return matrix[0] if group == 1 else matrix


def flat_weight(weight: np.ndarray) -> np.ndarray:
    """Weight for a channels-first flattened input window: ``[C * taps, M]`` (group 1)."""
    m = weight.shape[0]
    return np.ascontiguousarray(weight.reshape(m, -1).T)


def tap_inputs(spec: ConvSpec) -> list[np.ndarray]:
    """Per spatial axis, the input index each (kernel offset, output position) reads.

    Axis ``d`` gives a ``[kernel_d, out_d]`` int64 array; ``-1`` marks a tap that lands in
    the zero padding and so carries no weight. Needs a static ``spec``.
    """
    out = spec.output_spatial()
    r = spec.rank
    found = []
    for d in range(r):
        taps = np.arange(spec.kernel[d])[:, None] * spec.dilations[d]
        index = np.arange(out[d])[None, :] * spec.strides[d] + taps - spec.pads[d]
        found.append(np.where((index >= 0) & (index < spec.input_spatial[d]), index, -1))
    return found


def dense_matrix(weight: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """The conv as one fully connected layer: ``B`` of ``y.flat = x.flat @ B`` per sample.

    Rows are input values in ``[C, spatial...]`` order, columns output values in
    ``[M, out_spatial...]`` order, so ``B`` is ``[C*prod(spatial), M*prod(out_spatial)]``.
    The kernel is scattered in one vectorised assignment: every in-bounds
    (kernel offset, output position) pair gets the ``[C/g, M/g]`` weight block of that offset
    in every group. Pairs never collide (an input and an output fix the offset), so plain
    assignment is exact.
    """
    g, cg, mg = spec.group, spec.in_per_group, spec.out_per_group
    tap, rows, cols = _in_bounds_pairs(spec)
    n_in, n_out = int(np.prod(spec.input_spatial)), int(np.prod(spec.output_spatial()))
    matrix = np.zeros((g, cg, n_in, g, mg, n_out), dtype=weight.dtype)
    blocks = weight.reshape(g, mg, cg, spec.taps).transpose(0, 3, 2, 1)  # [g, taps, Cg, Mg]
    group = np.arange(g)[:, None]
    matrix[group, :, rows, group, :, cols] = blocks[:, tap]
    return matrix.reshape(spec.in_channels * n_in, spec.out_channels * n_out)


def _in_bounds_pairs(spec: ConvSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat (kernel offset, input position, output position) of every tap off the padding."""
    r = spec.rank
    in_flat = np.zeros((1,) * (2 * r), dtype=np.int64)
    valid = np.ones((1,) * (2 * r), dtype=bool)
    # Broadcast the per-axis tables to [k_1..k_r, o_1..o_r].
    for d, index in enumerate(tap_inputs(spec)):
        shape = [1] * (2 * r)
        shape[d], shape[r + d] = index.shape
        index = index.reshape(shape)
        in_flat = in_flat * spec.input_spatial[d] + index
        valid = valid & (index >= 0)
    in_flat, valid = np.broadcast_arrays(in_flat, valid)
    tap, out_flat = np.nonzero(valid.reshape(spec.taps, -1))
    return tap, in_flat.reshape(spec.taps, -1)[tap, out_flat], out_flat
