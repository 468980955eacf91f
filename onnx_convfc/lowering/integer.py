"""The integer GEMM shared by ``ConvInteger`` and ``QLinearConv``: patches times weight.

Channels-last patches are padded with the input zero point (so padding contributes
``x_zp - x_zp = 0``, exactly as in the conv) and multiplied by the weight matrix with
``MatMulInteger``, whose zero points take the conv's: the input's per tensor, the weight's
per tensor or per output channel (one per column of ``B``). The result is the conv's exact
int32 sum, laid out like the patches. Zero points that are constant zeros are left out.
"""

from __future__ import annotations

import numpy as np

from ..emit import Emitter
from ..quantconv import QuantConvSpec
from .operands import Operand, Operands, is_runtime, patch_matrix
from .patches import PatchRows, patch_rows


def emit_integer_gemm(spec: QuantConvSpec, weight: Operand, em: Emitter,
                      ops: Operands) -> tuple[str, PatchRows]:
    """Emit patches and MatMulInteger; return the int32 sum and the patch layout."""
    conv = spec.conv
    x_zp = w_zp = None
    if _matters(spec.x_zero_point):
        x_zp = ops.name(ops.reshape(spec.x_zero_point, (), "x_zero_point_scalar"),
                        "x_zero_point")
    rows = patch_rows(conv, em, pad_value=x_zp)
    inputs = [rows.rows, ops.name(patch_matrix(ops, weight, conv.group), "weight")]
    if _matters(spec.w_zero_point):
        w_zp = per_column(ops, spec.w_zero_point, spec, "w_zero_point")
    if x_zp or w_zp:
        inputs += [x_zp or "", w_zp or ""]
    return em.op("MatMulInteger", inputs), rows


def per_column(ops: Operands, value: Operand, spec: QuantConvSpec, what: str) -> str:
    """Name of a per-tensor (scalar) or per-output-channel operand shaped to broadcast over
    the GEMM result: ``[M]`` (group 1) or ``[g, 1, M/g]``."""
    if int(np.prod(value.shape)) == 1:
        return ops.name(ops.reshape(value, (), f"{what}_scalar"), what)
    g = spec.conv.group
    if g > 1:
        value = ops.reshape(value, (g, 1, spec.conv.out_per_group), f"{what}_per_group")
    return ops.name(value, what)


def _matters(value: Operand | None) -> bool:
    """A zero point that is absent or a constant zero changes nothing."""
    return value is not None and (is_runtime(value) or bool(np.any(value != 0)))
