"""Precomputed weights of the lowered forms: pure numpy, no ONNX.

Conv weights arrive as ``[M, C/group, k1, ..., kr]``. Each function returns the matrix
``B`` of ``y = x @ B`` for one lowering; the tests check them against a direct convolution.
"""

from __future__ import annotations

import numpy as np


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

