"""The lowerings, by name. Each module has ``NAME``, ``applies(spec)`` and ``emit(...)``.

``applies`` returns ``None`` when the lowering can take the conv, else the reason it cannot.
"""

from __future__ import annotations

from . import (
    convinteger,
    convtranspose,
    convtranspose_dense,
    dense,
    depthwise,
    fc,
    im2col,
    pointwise,
    qlinearconv,
)

LOWERINGS = {m.NAME: m for m in (pointwise, fc, depthwise, im2col, dense)}

# What ``--method auto`` tries, cheapest first: fc needs no Transposes (so it also takes a 1x1
# conv on a 1x1 input), depthwise no GEMM of thousands of tiny groups, pointwise no patches,
# and im2col every conv but a huge kernel over a run-time size (``taps.MAX_SLICE_TAPS``).
# ``dense`` is only used when asked for: its matrix grows with the square of the feature-map
# size.
AUTO_ORDER = ("fc", "depthwise", "pointwise", "im2col")

# The other ops of the conv family (``families.py`` says how each is read).
CONV_TRANSPOSE_LOWERINGS = {m.NAME: m for m in (convtranspose, convtranspose_dense)}
CONV_INTEGER_LOWERINGS = {convinteger.NAME: convinteger}
QLINEAR_CONV_LOWERINGS = {qlinearconv.NAME: qlinearconv}

# Every lowering name of every op: ``--only``/``--skip`` patterns that are not node globs.
LOWERING_NAMES = frozenset(LOWERINGS).union(
    CONV_TRANSPOSE_LOWERINGS, CONV_INTEGER_LOWERINGS, QLINEAR_CONV_LOWERINGS)
