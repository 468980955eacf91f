"""The lowerings, by name. Each module has ``NAME``, ``applies(spec)`` and ``emit(...)``.

``applies`` returns ``None`` when the lowering can take the conv, else the reason it cannot.
"""

from __future__ import annotations

from . import dense, fc, im2col, pointwise

LOWERINGS = {m.NAME: m for m in (pointwise, fc, im2col, dense)}

# What ``--method auto`` tries, cheapest first; im2col takes every conv. ``dense`` is only
# used when asked for: its matrix grows with the square of the feature-map size.
AUTO_ORDER = ("pointwise", "fc", "im2col")
