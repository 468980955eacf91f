"""``--objective latency``: time the candidate lowerings of each conv geometry, keep the fastest.

Under the default objective (``rules``) ``plan.choose`` picks a lowering from the geometry
alone (``AUTO_ORDER`` and the thresholds measured in ``docs/performance.md``). Under
``latency`` every lowering that takes a Conv (those of the auto order, and ``dense`` when its
matrix fits ``--max-dense-bytes``) is emitted by its own ``emit`` into a one-conv model with
random weights of the conv's shape and dtype, and timed on onnxruntime's CPU provider the way
``bench.py`` times models (no spinning, interleaved rounds, medians), next to the original
Conv. Candidates that emit the same graph (``pointwise`` and ``im2col`` of a 1x1 conv) are
timed once; a conv with a single distinct candidate is not timed at all. The rules' choice is
kept unless another candidate is at least ``MARGIN`` faster, so noise does not flip choices.

Timings are cached per geometry (op type, geometry with its static sizes, batch, bias,
candidates, dtype, opset, threads, onnxruntime and package versions, CPU) in memory, and in a
JSON file with ``--latency-cache``. Convs whose spatial sizes are only known at run time keep
the rules' choice: there is no fixed shape to time. ``--latency-budget-s`` bounds the time
spent timing.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, helper, numpy_helper

from .bench import make_session, thread_label, time_interleaved
from .conv import ConvSpec
from .emit import ConstantPool, Emitter, NameScope
from .io import InputError, save_text
from .lowering import LOWERINGS
from .options import RewriteOptions

# Keep the rules' choice unless another candidate is this much faster (single timings move
# by about +-10 % on a shared machine; medians of interleaved rounds by a few %).
MARGIN = 0.05
# Timed rounds per geometry: as many as fit in ``ROUND_SECONDS``, within these bounds.
MIN_ROUNDS, MAX_ROUNDS, ROUND_SECONDS = 5, 200, 0.5
CACHE_FORMAT = 1
DEFAULT_OPSET = 17
REFERENCE = "Conv"  # the label of the original op in every timing

# (models by label, the original first; feeds; intra-op threads; seconds to aim for)
#   -> median milliseconds per label that ran
Timer = Callable[[Mapping[str, ModelProto], Mapping[str, np.ndarray], int, float],
                 dict[str, float]]
# (spec, the rules' choice, candidate names) -> (lowering, report note)
Picker = Callable[[ConvSpec, str, tuple[str, ...]], tuple[str, str | None]]


def time_models(models: Mapping[str, ModelProto], feeds: Mapping[str, np.ndarray],
                threads: int, seconds: float) -> dict[str, float]:
    """Median ms per model on onnxruntime CPU, rounds interleaved (``bench.time_interleaved``).

    A model onnxruntime cannot load or run (a float64 Conv has no CPU kernel) is left out of
    the result instead of failing the rewrite.
    """
    sessions = {}
    for label, model in models.items():
        try:
            session = make_session(model, threads)
            session.run(None, feeds)  # the first run allocates; not timed
        except Exception:  # noqa: BLE001 - onnxruntime raises its own error types
            continue
        sessions[label] = session
    if not sessions:
        return {}
    started = time.perf_counter()
    for session in sessions.values():  # a second warm-up round tells how many fit
        session.run(None, feeds)
    per_round = max(time.perf_counter() - started, 1e-6)
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, seconds / per_round)))
    timings = time_interleaved(sessions, feeds, repeats=rounds, warmup=0)
    return {t.label: t.median_ms for t in timings}


@dataclass(frozen=True)
class Measured:
    """What one geometry's candidates came to: the distinct forms (candidates that emit the
    same graph as an earlier one left out) and the median ms of each model that ran, the
    original op's under ``REFERENCE``; no timings when there was one form only."""

    forms: tuple[str, ...]
    ms: dict[str, float]


@dataclass
class LatencyCache:
    """``Measured`` by geometry key, kept in memory and, with a ``path``, in a JSON file."""

    path: str | None = None
    entries: dict[str, Measured] = field(default_factory=dict)
    dirty: bool = False

    @classmethod
    def open(cls, path: str | None) -> LatencyCache:
        """Raises ``InputError`` for a file that is not a latency cache of this format."""
        cache = cls(path)
        if path is None or not Path(path).exists():
            return cache
        try:
            data = json.loads(Path(path).read_text())
            if data.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {CACHE_FORMAT}")
            cache.entries = {
                str(k): Measured(tuple(str(f) for f in v["forms"]),
                                 {str(label): float(ms) for label, ms in v["ms"].items()})
                for k, v in data["entries"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise InputError(f"--latency-cache {path}: not a latency cache ({err}); "
                             "delete it or name another file") from None
        return cache

    def get(self, key: str) -> Measured | None:
        return self.entries.get(key)

    def put(self, key: str, measured: Measured) -> None:
        self.entries[key] = measured
        self.dirty = True

    def save(self) -> None:
        if self.path is not None and self.dirty:
            entries = {k: asdict(v) for k, v in self.entries.items()}
            save_text(json.dumps({"format": CACHE_FORMAT, "entries": entries},
                                 indent=1, sort_keys=True) + "\n", self.path)
            self.dirty = False


@dataclass
class _Tally:
    """What the objective did over one rewrite, for the report's notes."""

    timed: int = 0  # distinct geometries timed now
    cached: int = 0  # distinct geometries whose timings came from the cache
    seconds: float = 0.0  # spent building and timing candidates
    single: int = 0  # convs with one distinct candidate: nothing to choose
    changed: int = 0  # convs given another lowering than the rules'
    measured: int = 0  # convs whose choice was timed
    chosen_ms: float = 0.0  # sums over the measured convs
    rules_ms: float = 0.0
    conv_ms: float = 0.0
    conv_known: int = 0  # measured convs whose original op could be timed
    kept: dict[str, int] = field(default_factory=dict)  # convs that kept the rules: reason


class LatencyObjective:
    """Chooses among the lowerings of each Conv by timing them, one geometry at a time.

    Args:
        options: the rewrite options (threads, budget, cache file, dense budget, groups).
        timer: times a set of models; ``time_models`` unless a test injects a fake.
    """

    def __init__(self, options: RewriteOptions, timer: Timer | None = None) -> None:
        self.options = options
        self.timer = timer or time_models
        self.cache = LatencyCache.open(options.latency_cache)
        self.tally = _Tally()
        self._seen: set[str] = set()  # keys met in this rewrite

    def picker(self, op_type: str, weight, input_shape: tuple | None,
               opset: int | None) -> Picker | None:
        """The ``plan.choose`` hook for one conv, or ``None`` where the rules decide alone
        (ops other than Conv, weights computed at run time)."""
        if op_type != "Conv" or not isinstance(weight, np.ndarray):
            return None
        batch = input_shape[0] if input_shape and input_shape[0] else 1
        return functools.partial(self.pick, dtype=weight.dtype, batch=batch, opset=opset)

    def pick(self, spec: ConvSpec, rules: str, candidates: tuple[str, ...], *,
             dtype: np.dtype, batch: int = 1,
             opset: int | None = None) -> tuple[str, str | None]:
        """The lowering to use and the report note saying why."""
        if rules not in candidates:  # excluded by --skip: the rules' verdict stands
            return rules, None
        if not spec.is_static:
            return self._keep(rules, "spatial size is not static, nothing fixed to time")
        if len(candidates) == 1:
            self.tally.single += 1
            return rules, None
        key = _key(spec, batch, dtype, opset, candidates, self.options)
        measured = self.cache.get(key)
        if measured is None:
            if self.tally.seconds >= self.options.latency_budget_s:
                return self._keep(rules, "--latency-budget-s spent")
            measured = self._measure(spec, candidates, dtype, batch, opset)
            self.cache.put(key, measured)
            self.tally.timed += len(measured.forms) > 1
        elif key not in self._seen and len(measured.forms) > 1:
            self.tally.cached += 1
        self._seen.add(key)
        if len(measured.forms) == 1:
            self.tally.single += 1
            return rules, None
        return self._decide(rules, [f for f in measured.forms if f in measured.ms], measured.ms)

    def _measure(self, spec: ConvSpec, candidates: tuple[str, ...], dtype, batch: int,
                 opset: int | None) -> Measured:
        started = time.perf_counter()
        models, feeds = _candidate_models(spec, candidates, dtype, batch, opset,
                                          self.options)
        forms = tuple(models)[1:]
        timings = {} if len(forms) == 1 else \
            self.timer(models, feeds, self.options.latency_threads, ROUND_SECONDS)
        self.tally.seconds += time.perf_counter() - started
        return Measured(forms, timings)

    def _decide(self, rules: str, timed: list[str],
                timings: dict[str, float]) -> tuple[str, str | None]:
        if rules not in timed:
            return self._keep(rules, f"{rules} could not run on onnxruntime")
        best = min(timed, key=lambda c: timings[c])
        if timings[best] > (1 - MARGIN) * timings[rules]:
            best = rules
        t = self.tally
        t.measured += 1
        t.changed += best != rules
        t.chosen_ms += timings[best]
        t.rules_ms += timings[rules]
        if REFERENCE in timings:
            t.conv_ms += timings[REFERENCE]
            t.conv_known += 1
        return best, _note(best, rules, timed, timings)

    def _keep(self, rules: str, reason: str) -> tuple[str, str]:
        self.tally.kept[reason] = self.tally.kept.get(reason, 0) + 1
        return rules, f"latency: {reason}; kept the rules' {rules}"

    def finish(self) -> list[str]:
        """Save the cache file and return the report's notes."""
        self.cache.save()
        t = self.tally
        threads = thread_label(self.options.latency_threads)
        text = (f"latency objective (onnxruntime {ort.__version__} CPU, threads {threads}): "
                f"timed {t.timed} distinct conv geometries ({t.cached} more from the cache) "
                f"in {t.seconds:.1f} s; {t.changed} of {t.measured} timed convs changed from "
                "the rules' choice")
        if t.measured:
            text += (f"; per run they add up to {t.chosen_ms:.3f} ms as chosen vs "
                     f"{t.rules_ms:.3f} ms under the rules ({t.rules_ms / t.chosen_ms:.2f}x)")
            if t.conv_known == t.measured:
                text += f" and {t.conv_ms:.3f} ms as onnxruntime's Conv"
        notes = [text]
        if t.single:
            notes.append(f"latency objective: {t.single} convs have one distinct lowering "
                         "(nothing to time)")
        notes.extend(f"latency objective: {n} convs kept the rules' choice: {reason}"
                     for reason, n in t.kept.items())
        return notes


def _note(best: str, rules: str, timed: list[str], timings: dict[str, float]) -> str:
    """``latency: im2col 1.21x vs depthwise 1.35x of Conv`` (times in ms when the original
    op could not be timed)."""
    conv = timings.get(REFERENCE)

    def cost(name: str) -> str:
        return f"{name} {timings[name] / conv:.2f}x" if conv else \
            f"{name} {timings[name]:.3f} ms"

    of = " of Conv" if conv else ""
    if best != rules:
        return f"latency: {cost(best)} vs rules' {cost(rules)}{of}"
    others = ", ".join(cost(c) for c in sorted(timed, key=lambda c: timings[c]) if c != best)
    return f"latency: kept {cost(best)}{of} (others {others})"


def _key(spec: ConvSpec, batch: int, dtype, opset: int | None, candidates: tuple[str, ...],
         options: RewriteOptions) -> str:
    """Everything the timings of one geometry depend on, as a stable string."""
    from . import __version__  # here: the package imports this module before defining it

    geometry = {k: v for k, v in asdict(spec).items()
                if k not in ("name", "input", "weight", "bias", "output")}
    return json.dumps({
        "op": "Conv", "geometry": geometry, "batch": batch, "bias": spec.bias is not None,
        "candidates": list(candidates),
        "dtype": np.dtype(dtype).name, "opset": opset, "threads": options.latency_threads,
        "split_groups": options.split_groups, "weight_left": options.weight_left,
        "onnxruntime": ort.__version__,
        "onnx_convfc": __version__, "cpu": f"{platform.machine()} x{os.cpu_count()}",
    }, sort_keys=True)


def _candidate_models(spec: ConvSpec, candidates: tuple[str, ...], dtype, batch: int,
                      opset: int | None, options: RewriteOptions
                      ) -> tuple[dict[str, ModelProto], dict[str, np.ndarray]]:
    """The original Conv and one model per distinct candidate form (same random weights),
    and the feeds they share. A candidate whose graph equals an earlier one's is dropped."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((spec.out_channels, spec.in_per_group, *spec.kernel))
    weight = weight.astype(dtype)
    bias = rng.standard_normal(spec.out_channels).astype(dtype) if spec.bias else None
    shape = [batch, spec.in_channels, *spec.input_spatial]
    feeds = {"x": rng.standard_normal(shape).astype(dtype)}
    models = {REFERENCE: _conv_model(spec, weight, bias, batch, opset)}
    seen: set[bytes] = set()
    for name in candidates:
        model = _lowered_model(models[REFERENCE], spec, name, weight, bias, opset, options)
        graph = model.graph.SerializeToString(deterministic=True)
        if graph not in seen:
            seen.add(graph)
            models[name] = model
    return models, feeds


def _conv_model(spec: ConvSpec, weight: np.ndarray, bias: np.ndarray | None, batch: int,
                opset: int | None) -> ModelProto:
    """One Conv of ``spec``'s geometry (pads explicit), input ``x``, output ``y``."""
    elem = helper.np_dtype_to_tensor_dtype(weight.dtype)
    inits = [numpy_helper.from_array(weight, "w")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
    node = helper.make_node("Conv", ["x", "w", *(["b"] if bias is not None else [])], ["y"],
                            name="conv", kernel_shape=list(spec.kernel),
                            strides=list(spec.strides), dilations=list(spec.dilations),
                            pads=list(spec.pads), group=spec.group)
    out = [batch, spec.out_channels, *spec.output_spatial()]
    graph = helper.make_graph(
        [node], "latency", [helper.make_tensor_value_info("x", elem, [batch, spec.in_channels,
                                                                    *spec.input_spatial])],
        [helper.make_tensor_value_info("y", elem, out)], inits)
    opsets = [helper.make_opsetid("", opset or DEFAULT_OPSET)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    return model


def _lowered_model(conv: ModelProto, spec: ConvSpec, name: str, weight: np.ndarray,
                   bias: np.ndarray | None, opset: int | None,
                   options: RewriteOptions) -> ModelProto:
    """``conv`` with its node replaced by what lowering ``name`` emits (its real ``emit``);
    built afresh, not copied, so as not to copy the conv's weights."""
    graph = helper.make_graph([], conv.graph.name, conv.graph.input, conv.graph.output)
    model = helper.make_model(graph, opset_imports=conv.opset_import)
    model.ir_version = conv.ir_version
    graph = model.graph
    em = Emitter("conv", ConstantPool(NameScope({"x", "y", "w", "b"}), graph), options,
                 opset or DEFAULT_OPSET)  # the opset the candidate model declares
    local = replace(spec, name="conv", input="x", weight="w", output="y",
                    bias="b" if bias is not None else None)
    LOWERINGS[name].emit(local, weight, bias, em)
    graph.node.extend(em.nodes)
    return model
