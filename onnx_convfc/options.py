"""``RewriteOptions``: the single source of every rewrite flag and API keyword.

Each field's metadata is its command-line help; ``cli.py`` builds the ``rewrite`` and
``inspect`` flags from these fields, so the Python API and the CLI cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

METHODS = ("auto", "pointwise", "fc", "depthwise", "im2col", "dense")
BATCHNORM_MODES = ("fold", "affine", "keep")
OBJECTIVES = ("rules", "latency")

MAX_DIM = 2**63 - 1  # ONNX dims are int64
SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


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
    if any(d > MAX_DIM for d in shape):
        raise ValueError(f"dimension over {MAX_DIM} (the int64 limit) in {text!r}")
    return name, shape


def parse_seconds(text: str) -> float:
    """``"60"`` -> ``60.0``; finite and >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def parse_bytes(text: str) -> int:
    """``64MiB`` -> ``67108864``; also plain integers, ``kB``/``MB``/``GB`` and ``KiB``/``GiB``."""
    number = text.strip().rstrip("bB")
    digits = number.rstrip("kKmMgGiI")
    unit = number[len(digits):].lower()
    try:
        value = float(digits) * SIZE_UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"expected a size such as 64MiB or 1000000, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected a finite size >= 0, got {text!r}")
    return int(value)


@dataclass(frozen=True)
class RewriteOptions:
    method: str = field(default="auto", metadata={
        "help": "lowering for every conv: auto picks fc when the kernel covers the whole "
                "padded input, depthwise (per-tap Mul, no MatMul) for one input channel per "
                "group unless --split-groups, pointwise for 1x1 kernels, im2col otherwise; "
                "dense is the exact "
                "fully connected layer of a fixed input shape (also for ConvTranspose; other "
                "methods are Conv's, the other ops take their own auto choice)",
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
    split_groups: bool = field(default=False, metadata={
        "action": "store_true",
        "help": "give grouped and depthwise convs one 2-D MatMul per group instead of one "
                "batched 3-D MatMul, so MatMul-only quantizers (MatMulNBits, quantize_dynamic) "
                "reach their weights too; more nodes, slower on onnxruntime"})
    weight_left: bool = field(default=False, metadata={
        "action": "store_true",
        "help": "pointwise convs over at least 28x28 pixels or with at most 256 channels, "
                "and convs over fewer than 16 channels, become W @ X on channels-first pixels "
                "or patches, with no Transposes (measured faster there on onnxruntime); the "
                "weight is then MatMul's A, which B-only quantizers (MatMulNBits) skip"})
    max_dense_bytes: int = field(default=64 * 2**20, metadata={
        "parse": parse_bytes, "metavar": "SIZE",
        "help": "largest matrix --method dense builds for one conv, e.g. 64MiB or 1GB; a "
                "larger conv falls back to the auto choice"})
    max_output_bytes: int = field(default=4 * 2**30, metadata={
        "parse": parse_bytes, "metavar": "SIZE",
        "help": "most bytes the rewrite may add in all (precomputed weights, index tables, "
                "nodes), estimated per conv before anything is built; the conv that would "
                "pass it stops the rewrite with an error"})
    strict: bool = field(default=False, metadata={
        "action": "store_true",
        "help": "make it an error when --method cannot take a conv, instead of the fallback "
                "(dense) or the skip (other methods)"})
    skip_runtime_weights: bool = field(default=False, metadata={
        "action": "store_true",
        "help": "leave alone convs whose weight, bias or quantization parameters are computed "
                "at run time; by default they are lowered with their reshapes done by nodes in "
                "the graph (weight-only quantizers cannot take such weights)"})
    batchnorm: str = field(default="fold", metadata={
        "choices": BATCHNORM_MODES,
        "help": "an inference BatchNormalization after a lowered conv (onnxruntime folds it "
                "into a Conv, not into a MatMul, and it stops Transposes cancelling): fold puts "
                "it into the lowered weights where the BN alone reads the conv (fastest; the "
                "conv's output name goes, --per-node parity compares the BN's output instead), "
                "else Mul + Add; affine makes it Mul + Add, every name kept; keep: leave it"})
    objective: str = field(default="rules", metadata={
        "choices": OBJECTIVES,
        "help": "how auto picks a lowering: rules decides from the geometry (the thresholds "
                "measured in docs/performance.md); latency times every lowering that takes a "
                "Conv, once per distinct geometry with static sizes, on onnxruntime CPU and "
                "keeps the fastest (the report says the choice and the gain)"})
    latency_cache: str | None = field(default=None, metadata={
        "metavar": "FILE",
        "help": "JSON file of --objective latency timings, read and updated, so rewrites "
                "of models with the same conv geometries time them once; without it they "
                "last one rewrite"})
    latency_threads: int = field(default=0, metadata={
        "type": int, "metavar": "N",
        "help": "intra-op threads of the sessions --objective latency times; 0 = "
                "onnxruntime's default (time with the count you will deploy with)"})
    latency_budget_s: float = field(default=120.0, metadata={
        "parse": parse_seconds, "metavar": "SECONDS",
        "help": "most seconds --objective latency spends building and timing candidates; "
                "geometries left when it is spent keep the rules' choice"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {', '.join(BATCHNORM_MODES)}, "
                             f"got {self.batchnorm!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, "
                             f"got {self.objective!r}")
        for name in ("max_dense_bytes", "max_output_bytes", "latency_threads",
                     "latency_budget_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def updated(self, **overrides) -> RewriteOptions:
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown rewrite option(s): {', '.join(sorted(unknown))}")
        normalised = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        if isinstance(normalised.get("input_shapes"), dict):
            normalised["input_shapes"] = tuple(
                (k, tuple(v)) for k, v in normalised["input_shapes"].items())
        return replace(self, **normalised)
