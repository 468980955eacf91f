"""``RewriteOptions``: the single source of every rewrite flag and API keyword.

Each field's metadata is its command-line help; ``cli.py`` builds the ``rewrite`` and
``inspect`` flags from these fields, so the Python API and the CLI cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

METHODS = ("auto", "pointwise", "fc", "im2col")


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME:1x3x224x224`` -> ``("NAME", (1, 3, 224, 224))``."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise ValueError(f"expected NAME:DxDxD, got {text!r}")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected NAME:DxDxD with integer dims, got {text!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in {text!r}")
    return name, shape


@dataclass(frozen=True)
class RewriteOptions:
    method: str = field(default="auto", metadata={
        "help": "lowering for every conv: auto picks pointwise for 1x1 kernels, fc when the "
                "kernel covers the whole padded input, im2col otherwise",
        "choices": METHODS})
    only: tuple[str, ...] = field(default=(), metadata={
        "help": "rewrite only convs whose node name matches this glob or whose lowering has "
                "this name (repeatable)", "metavar": "GLOB|LOWERING"})
    skip: tuple[str, ...] = field(default=(), metadata={
        "help": "leave convs alone whose node name matches this glob or whose lowering has "
                "this name (repeatable)", "metavar": "GLOB|LOWERING"})
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = field(default=(), metadata={
        "flag": "--input-shape", "parse": parse_input_shape, "metavar": "NAME:DxD..",
        "help": "fix the shape of a graph input for shape inference, e.g. "
                "images:1x3x640x640 (repeatable); symbolic dims stay symbolic otherwise"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")

    def updated(self, **overrides) -> RewriteOptions:
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown rewrite option(s): {', '.join(sorted(unknown))}")
        normalised = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        if isinstance(normalised.get("input_shapes"), dict):
            normalised["input_shapes"] = tuple(
                (k, tuple(v)) for k, v in normalised["input_shapes"].items())
        return replace(self, **normalised)
