"""The ``--max-output-bytes`` guard: what a lowering will add, estimated before it builds it.

``rewrite`` asks ``estimate`` before each conv's ``emit`` and ``charge`` refuses, with a
``BudgetError``, the conv that would take the running total past the limit, so nothing that
large is ever allocated: a rewrite's memory stays within the model's own size plus the limit.

Estimates are upper bounds in Python ints (declared dims can be large enough to overflow
int64) of everything a lowering adds that grows with the conv: the precomputed weight and
bias, Gather index parts (with their int64 working copies), dense matrices, and
``NODE_BYTES`` for each emitted node with its small int64 constants (one or more per kernel
tap). ``tests/test_hostile.py`` checks that every lowering has an estimate and compares each
with what the lowering really adds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

from .conv import ConvSpec
from .convtranspose import ConvTransposeSpec
from .lowering import (
    convinteger,
    convtranspose,
    convtranspose_dense,
    dense,
    depthwise,
    fc,
    im2col,
    patches,
    pointwise,
    qlinearconv,
)
from .options import RewriteOptions
from .quantconv import QuantConvSpec
from .report import size_text

# One emitted node with its names and small constants (measured: 150-400 bytes serialised).
NODE_BYTES = 512
# A chunk of Gather rows: Gather, Reshape, MatMul, Add, an index Add and a rows-shape
# constant (measured: 130 bytes a node).
CHUNK_NODES_BYTES = 1024
# Nodes every lowering emits whatever the kernel: Transposes, Reshapes, Pad, MatMul, Add...
FIXED_NODES = 32
# Bytes per entry of a Gather index part while it is built: int64 positions, then int32.
INDEX_BYTES = 12


# Values in a declared conv input from which no machine could run the model: 2**36 (256 GiB
# of float32). onnxruntime's extended optimisations fail with bad_alloc on the lowered form
# of such a conv (a fuzzed width of 2**40), while the Conv it replaces still loaded.
MAX_INPUT_VALUES = 1 << 36


class BudgetError(ValueError):
    """The rewrite would add more than ``--max-output-bytes``, or read an absurd input."""


def check_input_size(spec, conv: str) -> None:
    """``BudgetError`` for a conv whose declared input holds over ``MAX_INPUT_VALUES``."""
    values = spec.in_channels * math.prod(d for d in spec.input_spatial if d)
    if values > MAX_INPUT_VALUES:
        raise BudgetError(f"conv '{conv}' reads an input declared with {values:.1e} values "
                          "per image, more than any machine holds; its lowered form would not "
                          f"load in onnxruntime: fix the declared shape, or --skip '{conv}'")


def estimate(lowering: ModuleType, spec, itemsize: int, options: RewriteOptions) -> int:
    """Upper bound of the bytes ``lowering.emit`` adds for ``spec`` (weights of ``itemsize``)."""
    return ESTIMATES[lowering](spec, itemsize, options)


def charge(total: int, need: int, conv: str, lowering: str, limit: int) -> int:
    """``total + need``, or ``BudgetError`` when that passes ``limit``."""
    if total + need <= limit:
        return total + need
    so_far = f" on top of {size_text(total)} already added" if total else ""
    raise BudgetError(f"conv '{conv}' lowered by {lowering} would add about {size_text(need)}"
                      f"{so_far}, over --max-output-bytes {size_text(limit)}; raise it, or "
                      f"leave the conv alone with --skip '{conv}'")


def _patches(spec: ConvSpec, itemsize: int, options: RewriteOptions) -> int:
    """pointwise and im2col (and the depthwise forms they hand over to): the weight in any
    layout, the bias, up to three nodes per tap (Slice, Mul, Add) or for static sizes the
    ``[positions, taps]`` Gather indices and a few small nodes per chunk of rows."""
    weight = spec.out_channels * spec.in_per_group * spec.taps * itemsize
    gather = patches.uses_gather(spec)
    nodes = (0 if gather else 3 * spec.taps) + FIXED_NODES \
        + (2 * spec.group if options.split_groups else 0)
    chunks = len(patches.gemm_chunks(spec, itemsize)) * CHUNK_NODES_BYTES if gather else 0
    indices = _index_bytes(spec) if gather else 0
    return weight + spec.out_channels * itemsize + nodes * NODE_BYTES + chunks + indices


def _index_bytes(spec: ConvSpec) -> int:
    """A Gather form's index parts (``taps.index_parts``: one run of output positions per
    axis and the taps' offsets, summed in the graph), which grow with the feature map's
    sides, not with the weight; the Slice forms need none."""
    return (sum(spec.output_spatial()) + spec.taps) * INDEX_BYTES


def _depthwise(spec: ConvSpec, itemsize: int, options: RewriteOptions) -> int:
    """The per-tap scales, the bias, up to three nodes per tap and chunk, and the Gather
    form's index parts."""
    weight = spec.out_channels * spec.taps * itemsize
    gather = depthwise.uses_gather(spec)
    chunks = depthwise.chunk_count(spec, itemsize) if gather \
        else len(depthwise.shift_add_chunks(spec, itemsize))
    indices = _index_bytes(spec) if gather else 0
    nodes = 3 * spec.taps * chunks + FIXED_NODES
    return weight + spec.out_channels * itemsize + nodes * NODE_BYTES + indices


def _fc(spec: ConvSpec, itemsize: int, options: RewriteOptions) -> int:
    weight = spec.out_channels * spec.in_per_group * spec.taps * itemsize
    return weight + spec.out_channels * itemsize + FIXED_NODES * NODE_BYTES


def _dense(spec: ConvSpec, itemsize: int, options: RewriteOptions) -> int:
    """The matrix, the bias per output value, and the (tap, position) tables that place the
    kernel (``weights.dense_matrix``)."""
    rows, cols = dense.matrix_shape(spec)
    positions = math.prod(spec.output_spatial())
    tables = 4 * 8 * spec.taps * positions
    return (rows * cols + spec.out_channels * positions) * itemsize + tables \
        + FIXED_NODES * NODE_BYTES


def _subpixel(spec: ConvTransposeSpec, itemsize: int, options: RewriteOptions) -> int:
    """The phase conv's weight (``M * prod(s)`` output channels over a ``shift + 1`` kernel,
    built through about three copies) and tiled bias, its tap table, and the phase conv's
    patch indices."""
    phase = convtranspose.phase_conv(spec)
    phases, taps = math.prod(spec.strides), phase.taps
    weight = 3 * phase.out_channels * phase.in_per_group * taps * itemsize
    bias = phase.out_channels * itemsize
    table = 8 * phases * taps
    index = _index_bytes(phase) if patches.uses_gather(phase) else 0
    return weight + bias + table + index + (3 * taps + FIXED_NODES) * NODE_BYTES


def _transpose_dense(spec: ConvTransposeSpec, itemsize: int, options: RewriteOptions) -> int:
    """The matrix (built, then transposed: two copies), bias per output value, tap tables."""
    rows, cols = dense.matrix_shape(spec)
    positions = math.prod(spec.output_spatial())
    tables = 4 * 8 * spec.taps * math.prod(spec.input_spatial)
    return (2 * rows * cols + spec.out_channels * positions) * itemsize + tables \
        + FIXED_NODES * NODE_BYTES


def _quantized(spec: QuantConvSpec, itemsize: int, options: RewriteOptions) -> int:
    """The integer GEMM's patches and weight, plus per-channel int32 bias, zero points and
    float32 scales."""
    return _patches(spec.conv, itemsize, options) + 4 * 4 * spec.out_channels


ESTIMATES: dict[ModuleType, Callable[..., int]] = {
    pointwise: _patches,
    im2col: _patches,
    depthwise: _depthwise,
    fc: _fc,
    dense: _dense,
    convtranspose: _subpixel,
    convtranspose_dense: _transpose_dense,
    convinteger: _quantized,
    qlinearconv: _quantized,
}
