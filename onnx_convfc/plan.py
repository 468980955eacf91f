"""Choosing a lowering for one conv, or the stable reason it is left alone."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from .conv import ConvSpec
from .lowering import AUTO_ORDER, LOWERINGS
from .options import RewriteOptions


@dataclass(frozen=True)
class Decision:
    lowering: str | None
    reason: str | None = None


def choose(spec: ConvSpec, options: RewriteOptions) -> Decision:
    if _matches(spec.name, None, options.skip):
        return Decision(None, "excluded by --skip")
    if options.method == "auto":
        lowering = next(n for n in AUTO_ORDER if LOWERINGS[n].applies(spec) is None)
    else:
        refusal = LOWERINGS[options.method].applies(spec)
        if refusal:
            return Decision(None, f"{options.method} does not apply: {refusal}")
        lowering = options.method
    if _matches(None, lowering, options.skip):
        return Decision(None, f"excluded by --skip {lowering}")
    if options.only and not _matches(spec.name, lowering, options.only):
        return Decision(None, "not selected by --only")
    return Decision(lowering)


def _matches(node_name: str | None, lowering: str | None, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if lowering is not None and pattern == lowering:
            return True
        if node_name is not None and pattern not in LOWERINGS and fnmatchcase(node_name, pattern):
            return True
    return False
