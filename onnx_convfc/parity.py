"""Parity: run two models with onnxruntime on the same inputs and compare what they compute.

One session per model and provider, reused across runs; every comparison is vectorised numpy
over whole tensors. One rule for every tensor (see ``RULE``). ``per_node`` also exposes the
output of each conv of the original's main graph (the rewrite keeps those names; a conv with
a BatchNormalization folded in is compared at the BN's output) and finds the first one that
diverges.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, ValueInfoProto, helper
from onnx.reference import ReferenceEvaluator

from .batchnorm import is_batchnorm
from .families import is_conv
from .graphs import graphs
from .inputs import InputSpec, add_input_args, argtype, input_kwargs, plan_feeds
from .io import InputError, first_line, model_of, save_text
from .sessions import session_options

RULE = ("|rewritten - original| <= atol + rtol * |original| for every element; "
        "NaN and Inf pass only where both models produce the same one")

# (atol, rtol) by dtype; integer and bool tensors must match exactly.
DEFAULT_TOLERANCES = {
    "float64": (1e-8, 1e-7),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 2e-2),
}
SHORT_DTYPES = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
EP_SUFFIX = "ExecutionProvider"


class ProviderError(InputError):
    """A requested execution provider is unknown or not available here."""


# ---------------------------------------------------------------- providers

def parse_providers(text: str | Iterable[str]) -> list[str]:
    """``"cpu,cuda"`` (or a list of names) -> ``["cpu", "cuda"]``, duplicates dropped."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = [p.strip() for p in parts if p.strip()]
    return list(dict.fromkeys(names))


def resolve_providers(names: str | Iterable[str]) -> list[str]:
    """Full onnxruntime names for short (``cuda``) or full (``CUDAExecutionProvider``) names.

    Raises:
        ProviderError: a name onnxruntime does not know, or a provider this build lacks.
    """
    available = ort.get_available_providers()
    known = list(dict.fromkeys([*ort.get_all_providers(), *available]))
    names = parse_providers(names)
    if not names:
        raise ProviderError("no execution provider given (e.g. --providers cpu,cuda)")
    resolved = []
    for name in names:
        full = next((k for k in known if name.lower() in (k.lower(), short_name(k))), None)
        if full is None:
            raise ProviderError(f"unknown execution provider '{name}' (available here: "
                                f"{', '.join(map(short_name, available))})")
        if full not in available:
            raise ProviderError(f"provider '{name}' ({full}) is not available in this "
                                f"onnxruntime build (available: "
                                f"{', '.join(map(short_name, available))})")
        resolved.append(full)
    return list(dict.fromkeys(resolved))


def short_name(full: str) -> str:
    """``CUDAExecutionProvider`` -> ``cuda``."""
    return (full[:-len(EP_SUFFIX)] if full.endswith(EP_SUFFIX) else full).lower()


def provider_options(full: str) -> dict[str, str]:
    """Options for parity runs: CUDA without TF32, which alone causes 1e-3 relative errors."""
    if full == "CUDAExecutionProvider":
        return {"use_tf32": "0"}
    return {}


# ---------------------------------------------------------------- tolerances

def parse_tolerance(text: str) -> tuple[str | None, float]:
    """``1e-4`` -> ``(None, 1e-4)``; ``logits:1e-3`` -> ``("logits", 1e-3)``."""
    name, sep, value = text.rpartition(":")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected [NAME:]V with a number V, got {text!r}") from None
    if not math.isfinite(number) or number < 0 or (sep and not name):
        raise ValueError(f"expected [NAME:]V with a finite V >= 0, got {text!r}")
    return (name if sep else None), number


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    atol_from: str
    rtol_from: str

    def describe(self) -> str:
        return (f"atol {_tol(self.atol)} ({self.atol_from}), "
                f"rtol {_tol(self.rtol)} ({self.rtol_from})")


class Tolerances:
    """Per-dtype defaults, overridden globally or per tensor name (``[NAME:]V``)."""

    def __init__(self, atol=None, rtol=None) -> None:
        self.atol = _tolerance_table(atol)
        self.rtol = _tolerance_table(rtol)

    def names(self) -> set[str]:
        return {n for n in (*self.atol, *self.rtol) if n is not None}

    def for_tensor(self, name: str, dtype: np.dtype) -> Tolerance:
        dtype_name = np.dtype(dtype).name
        default = DEFAULT_TOLERANCES.get(dtype_name, (0.0, 0.0))
        label = (f"{SHORT_DTYPES[dtype_name]} default" if dtype_name in DEFAULT_TOLERANCES
                 else f"{dtype_name}: exact")
        atol, atol_from = _pick(self.atol, name, default[0], label, "--atol")
        rtol, rtol_from = _pick(self.rtol, name, default[1], label, "--rtol")
        return Tolerance(atol, rtol, atol_from, rtol_from)


def _tolerance_table(value) -> dict[str | None, float]:
    """None, a number, ``"[NAME:]V"``, a mapping or a list of those -> {name or None: V}."""
    if value is None:
        return {}
    if isinstance(value, (int, float)):
        value = [(None, float(value))]
    elif isinstance(value, str):
        value = [value]
    elif isinstance(value, Mapping):
        value = list(value.items())
    table: dict[str | None, float] = {}
    for item in value:
        name, number = parse_tolerance(item) if isinstance(item, str) else item
        table[name] = float(number)
    return table


def _pick(table: dict, name: str, default: float, label: str, flag: str) -> tuple[float, str]:
    if name in table:
        return table[name], f"{flag} {name}:"
    if None in table:
        return table[None], flag
    return default, label


# ---------------------------------------------------------------- statistics

@dataclass
class TensorStats:
    """Error statistics of one tensor, merged over runs (worst case, sums, weighted mean)."""

    elements: int
    max_abs: float
    mean_abs: float
    scale: float  # max |original| over finite elements
    max_rel: float  # max_abs / scale
    cosine: float
    outside: int
    nan_original: int
    inf_original: int
    nan_rewritten: int
    inf_rewritten: int

    def merge(self, other: TensorStats) -> TensorStats:
        total = self.elements + other.elements
        mean = ((self.mean_abs * self.elements + other.mean_abs * other.elements) / total
                if total else 0.0)
        return TensorStats(
            total, max(self.max_abs, other.max_abs), mean, max(self.scale, other.scale),
            max(self.max_rel, other.max_rel), min(self.cosine, other.cosine),
            self.outside + other.outside, self.nan_original + other.nan_original,
            self.inf_original + other.inf_original, self.nan_rewritten + other.nan_rewritten,
            self.inf_rewritten + other.inf_rewritten)

    @property
    def nonfinite(self) -> bool:
        return bool(self.nan_original or self.inf_original or self.nan_rewritten
                    or self.inf_rewritten)


def compare_arrays(original: np.ndarray, rewritten: np.ndarray, tol: Tolerance) -> TensorStats:
    """Statistics of ``rewritten`` against ``original`` (same shape).

    Works in the tensors' own precision when it is float32 or float64 (float64 otherwise) and
    with few temporaries: on large per-node tensors the allocations cost more than the math.
    Sums are accumulated in float64.
    """
    a, b = _as_float(original).ravel(), _as_float(rewritten).ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.subtract(b, a)
    np.abs(diff, out=diff)
    counts = dict.fromkeys(("nan_original", "inf_original", "nan_rewritten", "inf_rewritten"), 0)
    special_mismatch = 0
    if not np.isfinite(diff).all():  # a NaN or Inf somewhere (or an overflowing difference)
        finite_a, finite_b = np.isfinite(a), np.isfinite(b)
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        counts = dict(nan_original=int(nan_a.sum()), inf_original=int((~finite_a & ~nan_a).sum()),
                      nan_rewritten=int(nan_b.sum()),
                      inf_rewritten=int((~finite_b & ~nan_b).sum()))
        both = finite_a & finite_b
        same = (nan_a & nan_b) | (~finite_a & (a == b))
        special_mismatch = int(np.count_nonzero(~both & ~same))
        a, b, diff = a[both], b[both], diff[both]
        with np.errstate(over="ignore"):
            diff = np.abs(b.astype(np.float64) - a)  # finite pairs whose difference overflowed
    bound = np.abs(a)
    scale = float(bound.max()) if bound.size else 0.0
    bound *= tol.rtol
    bound += tol.atol
    outside = int(np.count_nonzero(diff > bound)) + special_mismatch
    max_abs = float(diff.max()) if diff.size else 0.0
    if scale:
        max_rel = max_abs / scale
    else:
        max_rel = 0.0 if max_abs == 0 else math.inf
    return TensorStats(
        elements=int(original.size), max_abs=max_abs,
        mean_abs=float(diff.mean(dtype=np.float64)) if diff.size else 0.0, scale=scale,
        max_rel=max_rel, cosine=_cosine(a, b), outside=outside, **counts)


def _as_float(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype in (np.float32, np.float64):
        return array
    return array.astype(np.float64)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    aa, bb = _dot(a, a), _dot(b, b)
    if aa == 0 or bb == 0:
        return 1.0 if aa == bb else 0.0
    return float(np.clip(_dot(a, b) / math.sqrt(aa * bb), -1.0, 1.0))


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Accumulated in float64 (float32 sums over millions of elements would show a perfect
    match as 0.99999), and not through BLAS, whose threads fight onnxruntime's for the cores."""
    return float(np.einsum("i,i->", a, b, dtype=np.float64))


@dataclass
class Comparison:
    """One tensor (a graph output, or a conv's output with ``node``) on one provider."""

    provider: str
    tensor: str
    node: str | None = None
    rewritten: bool = True  # per-node rows: whether the conv was lowered or left as it was
    detail: str | None = None  # per-node rows: what else the reader should know about the row
    dtype: str = "?"
    shape: tuple[int, ...] = ()
    tolerance: Tolerance | None = None
    stats: TensorStats | None = None
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None and self.stats is not None and self.stats.outside == 0

    @property
    def badness(self) -> float:
        """What ``worst`` sorts by: relative error, infinite for structural problems."""
        if self.problem is not None or self.stats is None:
            return math.inf
        return math.inf if self.stats.outside and self.stats.nonfinite else self.stats.max_rel

    def add(self, original: np.ndarray, rewritten: np.ndarray, tolerances: Tolerances) -> None:
        if self.problem:
            return
        if original.shape != rewritten.shape or original.dtype != rewritten.dtype:
            self.problem = (f"original gives {original.dtype} {_dims(original.shape)}, "
                            f"rewritten {rewritten.dtype} {_dims(rewritten.shape)}")
            return
        if self.tolerance is None:
            self.dtype, self.shape = str(original.dtype), tuple(original.shape)
            self.tolerance = tolerances.for_tensor(self.tensor, original.dtype)
        stats = compare_arrays(original, rewritten, self.tolerance)
        self.stats = stats if self.stats is None else self.stats.merge(stats)

    def verdict(self) -> str:
        if self.problem:
            return self.problem
        s = self.stats
        text = (f"max_abs={s.max_abs:.1e} (atol {_tol(self.tolerance.atol)}), "
                f"max_rel={s.max_rel:.1e} (rtol {_tol(self.tolerance.rtol)})")
        if s.outside:
            text += f", {s.outside}/{s.elements} elements outside"
        return text

    def to_dict(self) -> dict:
        data = {"provider": self.provider, "tensor": self.tensor, "passed": self.passed,
                "dtype": self.dtype, "shape": list(self.shape), "problem": self.problem}
        if self.node is not None:
            data.update(node=self.node, rewritten=self.rewritten, detail=self.detail)
        if self.tolerance is not None:
            data.update(atol=self.tolerance.atol, rtol=self.tolerance.rtol,
                        tolerance=self.tolerance.describe())
        if self.stats is not None:
            data.update({k: _json_number(v) for k, v in vars(self.stats).items()})
        return data


# ---------------------------------------------------------------- per-node probes

@dataclass(frozen=True)
class ConvProbe:
    """A conv of the original main graph whose output tensor the rewritten model computes."""

    node: str
    tensor: str
    rewritten: bool
    detail: str | None = None


def conv_probes(original: ModelProto, rewritten: ModelProto
                ) -> tuple[list[ConvProbe], list[tuple[str, str]]]:
    """Convs to compare (in topological order) and ``(conv, why not)`` for the others.

    A conv whose output is gone because its BatchNormalization was folded into it
    (``--batchnorm fold``) is compared at that BN's output, and its row says so.
    """
    producers = {out: node for node in rewritten.graph.node for out in node.output}
    batchnorms = _sole_batchnorm_readers(original)
    probes: list[ConvProbe] = []
    unexposed: list[tuple[str, str]] = []
    for node in original.graph.node:
        if is_conv(node):
            name, tensor = node.name or node.output[0], node.output[0]
            detail = None
            bn = batchnorms.get(tensor)
            if tensor not in producers and bn is not None and bn.output[0] in producers:
                tensor = bn.output[0]
                detail = (f"compared after BatchNormalization '{bn.name or tensor}', "
                          "which was folded into it")
            producer = producers.get(tensor)
            if producer is None:
                unexposed.append((name, f"output '{tensor}' is not computed in the rewritten "
                                        "main graph"))
            else:
                kept = is_conv(producer)
                probes.append(ConvProbe(name, tensor, not kept,
                                        f"kept as {producer.op_type}" if kept else detail))
        for where, inner in _subgraph_convs(node):
            unexposed.append((inner.name or inner.output[0],
                              f"inside {where}: subgraph values cannot be model outputs"))
    for function in original.functions:
        for inner in function.node:
            if is_conv(inner):
                unexposed.append((inner.name or inner.output[0],
                                  f"inside function {function.domain}.{function.name}: "
                                  "function values cannot be model outputs"))
    return probes, unexposed


def _sole_batchnorm_readers(model: ModelProto) -> dict[str, NodeProto]:
    """Tensor -> the BatchNormalization of the main graph that alone reads it: no other node
    (at any depth) and no graph output does."""
    readers = Counter(o.name for o in model.graph.output)
    for graph in graphs(model.graph):
        for node in graph.node:
            readers.update(set(node.input))
    return {n.input[0]: n for n in model.graph.node
            if is_batchnorm(n) and n.input and readers[n.input[0]] == 1}


def _subgraph_convs(node: NodeProto) -> Iterator[tuple[str, NodeProto]]:
    for attr in node.attribute:
        graphs: list[GraphProto] = [attr.g] if attr.type == AttributeProto.GRAPH else []
        graphs.extend(attr.graphs)
        where = f"{node.op_type} '{node.name or node.output[0]}' {attr.name}"
        for graph in graphs:
            for inner in graph.node:
                if is_conv(inner):
                    yield where, inner
                yield from _subgraph_convs(inner)


def _with_outputs(model: ModelProto, tensors: Iterable[str]) -> ModelProto:
    copy = ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(ValueInfoProto(name=t) for t in tensors if t not in present)
    return copy


# ---------------------------------------------------------------- the report

@dataclass
class ParityReport:
    """Everything a parity check found; ``passed`` is decided by the graph outputs."""

    original: str
    rewritten: str
    providers: list[str]
    seed: int
    runs: int
    inputs: list[InputSpec]
    per_node: bool = False
    outputs: list[Comparison] = field(default_factory=list)
    nodes: list[Comparison] = field(default_factory=list)
    unexposed: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("sessions", "original", "rewritten", "compare"), 0.0))

    @property
    def passed(self) -> bool:
        return not self.errors and bool(self.outputs) and all(c.passed for c in self.outputs)

    def first_divergence(self, provider: str) -> Comparison | None:
        """The first conv, in the original's topological order, outside tolerance."""
        return next((c for c in self.nodes if c.provider == provider and not c.passed), None)

    def worst_node(self, provider: str) -> Comparison | None:
        rows = [c for c in self.nodes if c.provider == provider]
        return max(rows, key=lambda c: c.badness) if rows else None

    def summary(self) -> str:
        good = sum(c.passed for c in self.outputs)
        verdict = "parity holds" if self.passed else "parity FAILED"
        text = (f"{verdict}: {good}/{len(self.outputs)} output checks within tolerance on "
                f"{', '.join(self.providers)}, {self.runs} run{'s' * (self.runs != 1)}")
        if self.errors:
            text += f", {len(self.errors)} error{'s' * (len(self.errors) != 1)}"
        s = self.seconds
        return (f"{text} (original {s['original']:.2f} s, rewritten {s['rewritten']:.2f} s, "
                f"compare {s['compare']:.2f} s)")

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "summary": self.summary(),
            "original": self.original,
            "rewritten": self.rewritten,
            "providers": self.providers,
            "seed": self.seed,
            "runs": self.runs,
            "rule": RULE,
            "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape),
                        "source": s.source} for s in self.inputs],
            "outputs": [c.to_dict() for c in self.outputs],
            "per_node": {
                "enabled": self.per_node,
                "first_divergence": {p: _node_name(self.first_divergence(p))
                                     for p in self.providers},
                "worst": {p: _node_name(self.worst_node(p)) for p in self.providers},
                "convs": [c.to_dict() for c in self.nodes],
                "unexposed": [{"node": n, "why": why} for n, why in self.unexposed],
            },
            "errors": list(self.errors),
            "notes": list(self.notes),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }

    def write_json(self, path: str | os.PathLike) -> None:
        save_text(json.dumps(self.to_dict(), indent=2) + "\n", path)

    def render(self, console) -> None:
        """Print inputs, the rule, one row per output (and per conv), and the summary."""
        console.print(f"parity of {self.original} vs {self.rewritten} on "
                      f"{', '.join(self.providers)}, seed {self.seed}")
        for spec in self.inputs:
            console.print(f"  input {spec.describe()}")
        console.print(f"rule: {RULE}")
        self._print_table(console, "output", self.outputs, lambda c: c.tensor, ("ok", "FAIL"))
        if self.per_node:
            self._render_nodes(console)
        for error in self.errors:
            console.print(f"error: {error}")
        for note in self.notes:
            console.print(f"note: {note}")
        console.print(self.summary())

    def _render_nodes(self, console) -> None:
        if self.nodes:
            console.print("per conv, in topological order:")
            self._print_table(console, "conv", self.nodes,
                              lambda c: f"{c.node} ({c.detail})" if c.detail else c.node,
                              ("ok", "DIVERGES"))
        for provider in self.providers:
            first = self.first_divergence(provider)
            if first is None:
                console.print(f"{provider}: every exposed conv is within tolerance")
                continue
            console.print(f"{provider}: first diverging conv '{first.node}': {first.verdict()}")
            worst = self.worst_node(provider)
            if worst is not first:
                console.print(f"{provider}: worst conv '{worst.node}': {worst.verdict()}")
        for node, why in self.unexposed:
            console.print(f"not compared: conv '{node}' ({why})")


    def _print_table(self, console, what: str, rows: list[Comparison], head,
                     verdicts: tuple[str, str]) -> None:
        from rich.measure import Measurement
        from rich.table import Table

        several = len(self.providers) > 1
        special = any(c.stats is not None and c.stats.nonfinite for c in rows)
        table = Table(box=None, pad_edge=False, header_style="bold")
        if several:
            table.add_column("provider", no_wrap=True)
        for col in (what, "shape", "max_abs (atol)", "max_rel (rtol)", "mean_abs", "cosine",
                    "outside", *(["nan, inf (orig/new)"] * special), "result"):
            table.add_column(col, no_wrap=True)
        for c in rows:
            table.add_row(*([c.provider] * several), head(c), *_cells(c, special),
                          verdicts[0] if c.passed else verdicts[1])
        # Whole names and numbers over fitting a narrow terminal: let the rows run long.
        natural = Measurement.get(console, console.options.update_width(1000), table).maximum
        table.width = natural
        console.print(table, crop=False)


def _cells(c: Comparison, special: bool) -> list[str]:
    if c.stats is None:
        return [_dims(c.shape), c.problem or "not run", "", "", "", "", *([""] * special)]
    s, t = c.stats, c.tolerance
    cells = [_dims(c.shape), f"{s.max_abs:.1e} ({_tol(t.atol)})",
             f"{s.max_rel:.1e} ({_tol(t.rtol)})", f"{s.mean_abs:.1e}", f"{s.cosine:.6f}",
             f"{s.outside}/{s.elements}"]
    if special:
        cells.append(f"{s.nan_original}/{s.nan_rewritten}, {s.inf_original}/{s.inf_rewritten}")
    return cells


def _node_name(c: Comparison | None) -> str | None:
    return None if c is None else c.node


def _tol(x: float) -> str:
    if x == 0:
        return "0"
    short = f"{x:.0e}"
    return short if float(short) == x else f"{x:.2e}"


def _dims(shape: Iterable[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _json_number(v):
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


# ---------------------------------------------------------------- running

def check_parity(original: ModelProto | str | os.PathLike,
                 rewritten: ModelProto | str | os.PathLike, *,
                 providers: str | Iterable[str] = ("cpu",), seed: int = 0, runs: int = 1,
                 input_shapes: Iterable[tuple[str, tuple[int, ...]]] = (),
                 input_values: Iterable[tuple[str, tuple[str, ...]]] = (),
                 inputs_npz: str | os.PathLike | None = None,
                 atol=None, rtol=None, per_node: bool = False) -> ParityReport:
    """Run both models on the same inputs with each provider and compare every output.

    Args:
        original, rewritten: ``ModelProto`` or paths; ``original`` is the reference.
        providers: ``"cpu,cuda"`` or names, short (``cuda``) or full (``CUDAExecutionProvider``).
        seed, runs: random inputs; each of the ``runs`` draws is independent.
        input_shapes, input_values, inputs_npz: see ``inputs.plan_feeds``.
        atol, rtol: a number, ``"[NAME:]V"`` strings, or ``{name or None: V}``; per-dtype
            defaults otherwise (``DEFAULT_TOLERANCES``).
        per_node: also compare the output of every conv of the original's main graph.

    Where onnxruntime cannot load or run the original (a float64 Conv on CPU, ``SAME_*``
    padding with dilations), its outputs come from ``onnx.reference`` and a note says so.

    Raises:
        InputError: unreadable models, bad inputs or tolerances, an unavailable provider,
            or an original model that neither onnxruntime nor onnx.reference can run.
    """
    if runs < 1:
        raise InputError(f"--runs must be at least 1, got {runs}")
    full_names = resolve_providers(providers)
    ref_model, ref_label = _load(original, "original")
    new_model, new_label = _load(rewritten, "rewritten")
    plan = plan_feeds(ref_model, seed=seed, input_shapes=input_shapes,
                      input_values=input_values, inputs_npz=inputs_npz)
    _check_same_inputs(ref_model, new_model)
    report = ParityReport(ref_label, new_label, [short_name(p) for p in full_names], seed, runs,
                          plan.specs, per_node=per_node, notes=list(plan.notes))
    tolerances = Tolerances(atol, rtol)
    outputs = [o.name for o in ref_model.graph.output]
    probes: list[ConvProbe] = []
    if per_node:
        probes, report.unexposed = conv_probes(ref_model, new_model)
        tensors = [p.tensor for p in probes]
        ref_model, new_model = _with_outputs(ref_model, tensors), _with_outputs(new_model, tensors)
        report.notes.append("per-node: conv outputs are exposed as model outputs, which can "
                            "stop onnxruntime fusing them with the next op")
    unknown = tolerances.names() - set(outputs) - {p.tensor for p in probes}
    if unknown:
        raise InputError(f"--atol/--rtol name no output: {', '.join(sorted(unknown))} "
                         f"(outputs: {', '.join(outputs)})")
    feeds = [plan.feeds(run) for run in range(runs)]
    sources = (_source(original, ref_model, per_node), _source(rewritten, new_model, per_node))
    try:
        for full in full_names:
            _compare_on(full, sources, outputs, probes, feeds, tolerances, report, ref_model)
    except ProviderError:
        raise
    except InputError as err:  # the original runs neither in onnxruntime nor in onnx.reference
        raise InputError(f"{err}{plan.failure_hint()}") from None
    report.errors = [f"{error}{plan.empty_hint()}" for error in report.errors]
    empty = [c.tensor for c in report.outputs if c.stats is not None and not c.stats.elements]
    if empty:
        report.notes.append(f"output {', '.join(dict.fromkeys(empty))}: empty, with the same "
                            "shape in both models, so equal with no values to compare")
    return report


def _compare_on(full: str, sources: tuple, outputs: list[str], probes: list[ConvProbe],
                feeds: list[dict], tolerances: Tolerances, report: ParityReport,
                ref_model: ModelProto) -> None:
    label = short_name(full)
    started = time.perf_counter()
    try:
        ref_session = _session(sources[0], full, report.original)
    except ProviderError:
        raise
    except InputError as err:
        ref_session = _Reference.instead(ref_model, label, err, report)
    try:
        new_session = _session(sources[1], full, report.rewritten)
    except InputError as err:
        report.errors.append(f"{label}: {err}")
        return
    report.seconds["sessions"] += time.perf_counter() - started
    new_names = {o.name for o in new_session.get_outputs()}
    rows = []
    for name in outputs:
        row = Comparison(label, name)
        if name not in new_names:
            row.problem = "missing in the rewritten model"
        rows.append(row)
    nodes = [Comparison(label, p.tensor, p.node, p.rewritten, p.detail) for p in probes]
    targets: dict[str, list[Comparison]] = {}  # a conv's output can also be a graph output
    for row in rows + nodes:
        if row.problem is None:
            targets.setdefault(row.tensor, []).append(row)
    fetch = list(targets)
    for feed in feeds:
        t0 = time.perf_counter()
        try:
            ref = _run(ref_session, fetch, feed, f"{report.original} on {label}")
        except InputError as err:
            if isinstance(ref_session, _Reference):
                raise
            ref_session = _Reference.instead(ref_model, label, err, report)
            ref = ref_session.run(fetch, feed)
        t1 = time.perf_counter()
        try:
            new = _run(new_session, fetch, feed, report.rewritten)
        except InputError as err:
            report.errors.append(f"{label}: {err}")
            return
        t2 = time.perf_counter()
        for name, a, b in zip(fetch, ref, new):
            for row in targets[name]:
                if isinstance(a, np.ndarray):
                    row.add(a, b, tolerances)
                else:
                    row.problem = "not a tensor (sequence or map); not compared"
        report.seconds["original"] += t1 - t0
        report.seconds["rewritten"] += t2 - t1
        report.seconds["compare"] += time.perf_counter() - t2
    report.outputs.extend(rows)
    report.nodes.extend(nodes)


def _load(model: ModelProto | str | os.PathLike, role: str) -> tuple[ModelProto, str]:
    label = f"{role} model" if isinstance(model, ModelProto) else str(model)
    return model_of(model), label


def _source(given, model: ModelProto, modified: bool) -> str | bytes:
    """A path onnxruntime can load itself (external data, over 2 GiB), else the bytes."""
    if not modified and not isinstance(given, ModelProto):
        return str(given)
    try:
        return model.SerializeToString()
    except ValueError as err:
        raise InputError(f"cannot serialise the model for onnxruntime ({err}); models over "
                         "2 GiB need a path and no --per-node") from None


def _check_same_inputs(original: ModelProto, rewritten: ModelProto) -> None:
    def signature(model: ModelProto) -> dict[str, int]:
        initialized = {t.name for t in model.graph.initializer}
        return {v.name: v.type.tensor_type.elem_type for v in model.graph.input
                if v.name not in initialized}

    a, b = signature(original), signature(rewritten)
    if a != b:
        raise InputError(f"the models take different inputs: original {sorted(a)}, "
                         f"rewritten {sorted(b)}")


def _session(source: str | bytes, full: str, label: str) -> ort.InferenceSession:
    options = session_options()
    try:
        session = ort.InferenceSession(source, options,
                                       providers=[(full, provider_options(full))])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own error types
        raise InputError(f"{label}: onnxruntime cannot load it on {short_name(full)} "
                         f"({first_line(err)})") from None
    if full not in session.get_providers():
        raise ProviderError(f"onnxruntime could not start {full} for {label} (it fell back to "
                            f"{', '.join(session.get_providers())}); check the install")
    return session


class _Reference:
    """The original run by ``onnx.reference`` where onnxruntime cannot run it: a float64 Conv
    (no CPU kernel), ``auto_pad=SAME_*`` with dilations (refused), an op the provider lacks.
    The reference evaluator implements the ONNX spec itself, slowly; it is the arbiter the
    lowering must agree with. Outputs come back in the dtypes the model declares."""

    def __init__(self, model: ModelProto, why: str) -> None:
        self.why = why
        self.dtypes = {o.name: helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type)
                       for o in model.graph.output if o.type.tensor_type.elem_type}
        try:
            self.evaluator = ReferenceEvaluator(model)
        except Exception as err:  # noqa: BLE001 - the reference raises anything
            raise self._failed(err) from None

    @classmethod
    def instead(cls, model: ModelProto, label: str, err: InputError,
                report: ParityReport) -> _Reference:
        """Switch to the reference for provider ``label`` and say so in the report."""
        reference = cls(model, str(err))
        report.notes.append(f"{label}: {err}; the original's outputs come from onnx.reference "
                            "(the ONNX spec's reference implementation) instead")
        return reference

    def run(self, fetch: list[str], feed: dict) -> list:
        try:
            results = self.evaluator.run(fetch, feed)
        except Exception as err:  # noqa: BLE001 - the reference raises anything
            raise self._failed(err) from None
        return [np.asarray(r, self.dtypes[n]) if n in self.dtypes and isinstance(r, np.ndarray)
                else r for n, r in zip(fetch, results)]

    def _failed(self, err: Exception) -> InputError:
        return InputError(f"{self.why}, and onnx.reference cannot run it either "
                          f"({first_line(err)})")


def _run(session: ort.InferenceSession, fetch: list[str], feed: dict, label: str) -> list:
    try:
        return session.run(fetch, feed)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own error types
        raise InputError(f"{label}: onnxruntime failed to run it ({first_line(err)})") \
            from None


# ---------------------------------------------------------------- command-line groups

def add_provider_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("providers")
    group.add_argument("--providers", default="cpu", metavar="LIST",
                       help="comma-separated execution providers, short (cpu, cuda) or full "
                            "names; CUDA runs with TF32 off; a provider that is not "
                            "available is an error (default: %(default)s)")


def add_comparison_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tolerances and comparison")
    for index, flag in enumerate(("--atol", "--rtol")):
        defaults = ", ".join(f"{SHORT_DTYPES[k]} {_tol(v[index])}"
                             for k, v in DEFAULT_TOLERANCES.items())
        group.add_argument(flag, action="append", default=[], type=argtype(parse_tolerance),
                           metavar="[NAME:]V",
                           help=f"{flag[2:]} for every output, or for output NAME only "
                                f"(repeatable); defaults: {defaults}; integers exact")
    group.add_argument("--per-node", action="store_true",
                       help="also compare every conv's output and name the first that diverges")
    group.add_argument("--runs", type=int, default=1,
                       help="independent random draws of the inputs (default: %(default)s)")


def add_parity_args(parser: argparse.ArgumentParser, *, input_shape: bool = True) -> None:
    """The inputs, tolerances and providers groups of ``check`` and ``rewrite --verify``."""
    add_input_args(parser, input_shape=input_shape)
    add_comparison_args(parser)
    add_provider_args(parser)


def parity_kwargs(args: argparse.Namespace) -> dict:
    """``check_parity`` keywords from arguments parsed with ``add_parity_args``."""
    return dict(input_kwargs(args), providers=args.providers, runs=args.runs,
                atol=args.atol or None, rtol=args.rtol or None, per_node=args.per_node)
