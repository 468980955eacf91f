"""Choosing a lowering for one conv, or the stable reason it is left alone."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from types import ModuleType

import numpy as np

from .conv import ConvSpec
from .lowering import AUTO_ORDER, LOWERING_NAMES, LOWERINGS
from .options import RewriteOptions

# Methods that hand a conv they cannot take to the auto choice instead of skipping it.
FALLS_BACK = ("dense",)
# Lowerings that emit no MatMul: ``--split-groups`` asks for output whose every conv weight a
# MatMul-only quantizer can take, so ``auto`` passes them over then.
GEMM_FREE = ("depthwise",)
# Weight dtypes whose lowered form onnxruntime's CPU provider runs (measured, onnxruntime 1.32:
# bfloat16 has no CPU MatMul, Gemm or Pad kernel, so its lowered form would not load).
LOWERABLE_DTYPES = ("float32", "float16", "float64")


class PlanError(ValueError):
    """``--strict``: the requested method cannot take a conv."""


@dataclass(frozen=True)
class Decision:
    lowering: str | None
    reason: str | None = None
    note: str | None = None  # why the requested method gave way to ``lowering``
    fallback: bool = False  # the requested method refused the conv: ``lowering`` is auto's


def choose(spec: ConvSpec, options: RewriteOptions, itemsize: int = 4,
           lowerings: Mapping[str, ModuleType] = LOWERINGS,
           auto_order: tuple[str, ...] = AUTO_ORDER,
           pick: Callable[[ConvSpec, str, tuple[str, ...]], tuple[str, str | None]]
           | None = None) -> Decision:
    """Pick the lowering of one conv; ``itemsize`` is its weight's, for the dense budget.

    ``lowerings`` and ``auto_order`` are those of the conv's op (``families.py``); a
    ``--method`` the op has no lowering of means the op's auto choice. ``pick``
    (``--objective latency``, ``objective.py``) may replace the auto choice by another of the
    lowerings that take the conv, and give the note that says why.

    Raises:
        PlanError: with ``--strict``, when ``--method`` cannot take a selected conv.
    """
    if _matches(spec.name, None, options.skip):
        return Decision(None, "excluded by --skip")
    note, fallback = None, False
    if options.split_groups:
        auto_order = tuple(n for n in auto_order if n not in GEMM_FREE)
    if options.method not in lowerings:
        lowering, refusal = _auto(spec, lowerings, auto_order)
        if lowering is None:
            return Decision(None, refusal)
        if pick is not None:
            lowering, note = pick(spec, lowering,
                                  _candidates(spec, options, itemsize, lowerings, auto_order))
    else:
        refusal = _refusal(spec, options.method, options, itemsize, lowerings)
        if refusal:
            problem = f"{options.method} does not apply: {refusal}"
            selected = not options.only or _matches(spec.name, options.method, options.only)
            if options.strict and selected:
                raise PlanError(f"conv '{spec.name}': {problem} (--strict)")
            if options.method not in FALLS_BACK:
                return Decision(None, problem)
            lowering, refusal = _auto(spec, lowerings, auto_order)
            if lowering is None:
                return Decision(None, f"{problem}; {refusal}")
            note, fallback = f"{problem}; fell back to {lowering}", True
        else:
            lowering = options.method
    if _matches(None, lowering, options.skip):
        return Decision(None, f"excluded by --skip {lowering}")
    if options.only and not _matches(spec.name, lowering, options.only):
        return Decision(None, "not selected by --only")
    return Decision(lowering, note=note, fallback=fallback)


def dtype_refusal(dtype) -> str | None:
    """Why a conv with weights of ``dtype`` is left alone, or ``None`` when it can be lowered."""
    name = np.dtype(dtype).name
    if name in LOWERABLE_DTYPES:
        return None
    return (f"{name} weights: onnxruntime has no CPU MatMul/Pad kernel for {name}, "
            "so the lowered form could not run")


def onnxruntime_refuses(op_type: str, spec, dtype) -> str | None:
    """Why onnxruntime (1.32, CPU) cannot run the original node, or ``None`` (measured). The
    lowered form follows the ONNX spec either way; ``--verify`` then compares it with
    ``onnx.reference``."""
    geometry = getattr(spec, "conv", spec)  # the quantized ops' ConvSpec
    if op_type in ("Conv", "ConvTranspose") and dtype is not None \
            and np.dtype(dtype) == np.float64:
        return f"onnxruntime has no float64 {op_type} kernel on CPU"
    if op_type != "ConvTranspose" and geometry.auto_pad.startswith("SAME") \
            and any(d > 1 for d in geometry.dilations):
        return (f"onnxruntime refuses auto_pad={geometry.auto_pad} with dilations "
                f"{list(geometry.dilations)}")
    return None


def _auto(spec: ConvSpec, lowerings: Mapping[str, ModuleType],
          auto_order: tuple[str, ...]) -> tuple[str | None, str | None]:
    """The first lowering in ``auto_order`` that takes the conv, or ``None`` and the last
    refusal (im2col refuses only kernels over the tap cap with run-time sizes;
    ConvTranspose's subpixel may refuse)."""
    refusal = None
    for name in auto_order:
        refusal = lowerings[name].applies(spec)
        if refusal is None:
            return name, None
    return None, refusal


def _candidates(spec: ConvSpec, options: RewriteOptions, itemsize: int,
                lowerings: Mapping[str, ModuleType],
                auto_order: tuple[str, ...]) -> tuple[str, ...]:
    """Every lowering that takes the conv, auto order first, then the dense forms that fit
    ``--max-dense-bytes``; none that ``--skip`` names."""
    dense = [n for n, m in lowerings.items() if hasattr(m, "over_budget") and n not in auto_order]
    return tuple(n for n in (*auto_order, *dense) if not _matches(None, n, options.skip)
                 and _refusal(spec, n, options, itemsize, lowerings) is None)


def _refusal(spec: ConvSpec, name: str, options: RewriteOptions, itemsize: int,
             lowerings: Mapping[str, ModuleType]) -> str | None:
    lowering = lowerings[name]
    refusal = lowering.applies(spec)
    if refusal is None and hasattr(lowering, "over_budget"):  # the dense forms
        refusal = lowering.over_budget(spec, itemsize, options.max_dense_bytes)
    return refusal


def _matches(node_name: str | None, lowering: str | None, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if lowering is not None and pattern == lowering:
            return True
        if node_name is not None and pattern not in LOWERING_NAMES \
                and fnmatchcase(node_name, pattern):
            return True
    return False
