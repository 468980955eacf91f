"""onnxruntime latency of models side by side: interleaved runs, medians, ratios.

Timing two sessions one after the other lets a busy neighbour, a frequency change or a warm
cache favour one of them. Here every round runs each session once, in an order that rotates
from round to round (A B, B A, A B, ...), so drift hits all of them alike. Each session gets
its median; the ratio is the median of the per-round ratios to the first (reference) session,
with their 25th-75th percentiles as the noise figure.

Intra-op threads do not spin between runs (``session.intra_op.allow_spinning=0``): the
spinning pool of the session that just ran would steal cores from the next one (measured:
interleaved ratios of 2.9x-6.5x for a 1.7x model with spinning on, 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .inputs import InputSpec, add_input_args, argtype, input_kwargs, plan_feeds
from .io import InputError, first_line, model_of, save_text
from .parity import add_provider_args, resolve_providers, short_name
from .profile import LoweringProfile, break_down, lowerings_from_json, profile_nodes
from .report import Report
from .sessions import DEFAULT_THREADS, make_session  # the tools import both from here

# The ONNX Model Zoo classics bundled in the onnx package (light_<name>.onnx), for the tools.
LIGHT_MODELS = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def thread_label(threads: int) -> str:
    return "default" if threads == DEFAULT_THREADS else str(threads)


def parse_threads(text: str) -> tuple[int, ...]:
    """``"default,1"`` -> ``(0, 1)``; 0 or ``default`` is onnxruntime's own choice."""
    counts = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part.lower() == "default":
            counts.append(DEFAULT_THREADS)
            continue
        try:
            value = int(part)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"expected thread counts like default,1,2, got {text!r}")
        counts.append(value)
    if not counts:
        raise ValueError("no thread count given (e.g. --threads default,1)")
    return tuple(dict.fromkeys(counts))


@dataclass(frozen=True)
class Timing:
    """Latency of one session, and its ratio to the reference session (the first one)."""

    label: str
    median_ms: float
    ratio: float
    ratio_q25: float
    ratio_q75: float
    runs: int


def time_interleaved(sessions: Mapping[str, ort.InferenceSession],
                     feeds: Mapping[str, np.ndarray], *, repeats: int = 30, warmup: int = 3,
                     min_seconds: float = 0.0) -> list[Timing]:
    """Run every session once per round, rotating the order; ratios are to the first session.

    Runs at least ``repeats`` rounds and keeps going until ``min_seconds`` have passed.
    """
    labels = list(sessions)
    for _ in range(warmup):
        for label in labels:
            sessions[label].run(None, feeds)
    samples: dict[str, list[float]] = {label: [] for label in labels}
    start = time.perf_counter()
    rnd = 0
    while rnd < repeats or time.perf_counter() - start < min_seconds:
        shift = rnd % len(labels)
        for label in labels[shift:] + labels[:shift]:
            t0 = time.perf_counter_ns()
            sessions[label].run(None, feeds)
            samples[label].append((time.perf_counter_ns() - t0) / 1e6)
        rnd += 1
    ref = np.asarray(samples[labels[0]])
    timings = []
    for label in labels:
        values = np.asarray(samples[label])
        per_round = values / ref
        timings.append(Timing(label, float(np.median(values)), float(np.median(per_round)),
                              float(np.percentile(per_round, 25)),
                              float(np.percentile(per_round, 75)), len(values)))
    return timings


def compare_models(models: Mapping[str, onnx.ModelProto | str | bytes],
                   feeds: Mapping[str, np.ndarray], *,
                   threads: Sequence[int] = (DEFAULT_THREADS, 1),
                   provider: str = "CPUExecutionProvider", repeats: int = 30,
                   warmup: int = 3, min_seconds: float = 0.0) -> dict[int, list[Timing]]:
    """Time the models side by side at each thread count; the first model is the reference."""
    results = {}
    for n in threads:
        sessions = {label: make_session(m, n, provider) for label, m in models.items()}
        results[n] = time_interleaved(sessions, feeds, repeats=repeats, warmup=warmup,
                                      min_seconds=min_seconds)
    return results


def format_table(results: Mapping[int, Sequence[Timing]], provider: str) -> str:
    """Plain-text table: one row per thread count and model."""
    lines = [f"provider {provider}; ratio = median over rounds of (model / first model), "
             "[q25, q75] of those ratios",
             f"{'threads':>7}  {'model':<28} {'median ms':>10} {'ratio':>6}  {'q25-q75':<13} runs"]
    for n, timings in results.items():
        for t in timings:
            lines.append(f"{thread_label(n):>7}  {t.label:<28} {t.median_ms:>10.3f} "
                         f"{t.ratio:>6.3f}  {t.ratio_q25:.3f}-{t.ratio_q75:.3f}  {t.runs}")
    return "\n".join(lines)


@dataclass(frozen=True)
class BenchRow:
    """Original vs rewritten on one provider at one thread count."""

    provider: str
    threads: str
    original_ms: float
    rewritten_ms: float
    ratio: float
    ratio_q25: float
    ratio_q75: float
    runs: int


@dataclass
class BenchReport:
    """What ``bench_models`` measured, ready to print or write as JSON."""

    original: str
    rewritten: str
    inputs: list[InputSpec]
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profile: LoweringProfile | None = None  # with ``profile=True``

    def to_dict(self) -> dict:
        data = {"original": self.original, "rewritten": self.rewritten,
                "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)}
                           for s in self.inputs],
                "rows": [asdict(r) for r in self.rows], "notes": self.notes,
                "method": __doc__.split("\n\n")[1].replace("\n", " ")}
        if self.profile is not None:
            data["profile"] = self.profile.to_dict()
        return data

    def write_json(self, path: str | os.PathLike) -> None:
        save_text(json.dumps(self.to_dict(), indent=2) + "\n", path)

    def render(self, console) -> None:
        for spec in self.inputs:
            console.print(f"input {spec.describe()}")
        for note in self.notes:
            console.print(f"note: {note}")
        console.print(f"{'provider':<9} {'threads':>7} {'original ms':>12} {'rewritten ms':>13} "
                      f"{'ratio':>6}  {'q25-q75':<11} {'runs':>5}")
        for r in self.rows:
            console.print(f"{r.provider:<9} {r.threads:>7} {r.original_ms:>12.3f} "
                          f"{r.rewritten_ms:>13.3f} {r.ratio:>6.3f}  "
                          f"{r.ratio_q25:.2f}-{r.ratio_q75:.2f}   {r.runs:>5}")
        console.print("ratio = rewritten / original: median of per-round ratios, runs "
                      "interleaved in rotating order")
        if self.profile is not None:
            self.profile.render(console)
            if any(c.lowering is None for c in self.profile.convs):
                console.print("lowerings unknown: pass --rewrite-report, the JSON that "
                              "'rewrite --report-json' wrote")


def bench_models(original: onnx.ModelProto | str | os.PathLike,
                 rewritten: onnx.ModelProto | str | os.PathLike, *,
                 providers: str | Iterable[str] = ("cpu",),
                 threads: Sequence[int] = (DEFAULT_THREADS, 1), repeats: int = 30,
                 warmup: int = 3, min_seconds: float = 0.0, seed: int = 0,
                 input_shapes: Iterable[tuple[str, tuple[int, ...]]] = (),
                 input_values: Iterable[tuple[str, tuple[str, ...]]] = (),
                 inputs_npz: str | os.PathLike | None = None, profile: bool = False,
                 lowerings: Report | Mapping[str, str | None] | None = None) -> BenchReport:
    """Latency of ``rewritten`` against ``original``, side by side, per provider and threads.

    Inputs come from ``inputs.plan_feeds`` (same options as parity). The thread count applies
    to the CPU provider's intra-op pool; other providers get one row at their own setting.
    ``profile``: also profile both models on the first provider at one thread, ``repeats``
    runs, and say where the time goes per lowering (``profile.break_down``; the rewrite's
    report or ``lowerings`` names each conv's lowering).

    Raises:
        InputError: unreadable models, bad inputs, an unavailable provider, a model that
            onnxruntime cannot load or run, or bad repeat counts.
    """
    if repeats < 1 or warmup < 0 or min_seconds < 0:
        raise InputError("--repeats must be >= 1, --warmup and --min-seconds >= 0")
    full_names = resolve_providers(providers)
    models = {"original": model_of(original), "rewritten": model_of(rewritten)}
    plan = plan_feeds(models["original"], seed=seed, input_shapes=input_shapes,
                      input_values=input_values, inputs_npz=inputs_npz)
    feeds = plan.feeds(0)
    report = BenchReport(_label(original, "original"), _label(rewritten, "rewritten"),
                         plan.specs, notes=list(plan.notes))
    data = {label: m.SerializeToString() for label, m in models.items()}
    for full in full_names:
        counts = threads if full == "CPUExecutionProvider" else (DEFAULT_THREADS,)
        for n in counts:
            sessions = {label: _session(d, n, full, label) for label, d in data.items()}
            try:
                ref, new = time_interleaved(sessions, feeds, repeats=repeats, warmup=warmup,
                                            min_seconds=min_seconds)
            except Exception as err:  # noqa: BLE001 - onnxruntime raises its own error types
                raise InputError(f"onnxruntime failed to run a model on {short_name(full)} "
                                 f"({first_line(err)})"
                                 f"{plan.failure_hint()}") from None
            report.rows.append(BenchRow(short_name(full), thread_label(n), ref.median_ms,
                                        new.median_ms, new.ratio, new.ratio_q25,
                                        new.ratio_q75, new.runs))
    if profile:
        before, after = (profile_nodes(data[label], feeds, runs=repeats, provider=full_names[0])
                         for label in ("original", "rewritten"))
        report.profile = break_down(models["original"], models["rewritten"], before, after,
                                    lowerings=lowerings,
                                    input_shapes=[(k, v.shape) for k, v in feeds.items()])
    return report


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """The inputs, providers and timing groups of ``bench``."""
    add_input_args(parser)
    add_provider_args(parser)
    group = parser.add_argument_group("timing")
    group.add_argument("--threads", type=argtype(parse_threads), default=(DEFAULT_THREADS, 1),
                       metavar="LIST", help="intra-op thread counts of the CPU provider, "
                                            "'default' = onnxruntime's choice "
                                            "(default: default,1)")
    group.add_argument("--repeats", type=int, default=30,
                       help="timed rounds, each runs both models once (default: %(default)s)")
    group.add_argument("--warmup", type=int, default=3,
                       help="untimed rounds first (default: %(default)s)")
    group.add_argument("--min-seconds", type=float, default=0.0,
                       help="keep timing rounds until this many seconds passed "
                            "(default: %(default)s)")
    group.add_argument("--profile", action="store_true",
                       help="then profile both models at 1 thread (--repeats runs): ms per "
                            "lowering, per op type and per conv kind")
    group.add_argument("--rewrite-report", metavar="FILE",
                       help="the JSON 'rewrite --report-json' wrote: names the lowering of "
                            "each conv in the profile (implies --profile)")


def bench_kwargs(args: argparse.Namespace) -> dict:
    """``bench_models`` keywords from arguments parsed with ``add_bench_args``."""
    lowerings = lowerings_from_json(args.rewrite_report) if args.rewrite_report else None
    return dict(input_kwargs(args), providers=args.providers, threads=args.threads,
                repeats=args.repeats, warmup=args.warmup, min_seconds=args.min_seconds,
                profile=args.profile or lowerings is not None, lowerings=lowerings)


def _label(given, role: str) -> str:
    return f"{role} model" if isinstance(given, onnx.ModelProto) else str(given)


def _session(data: bytes, threads: int, provider: str, label: str) -> ort.InferenceSession:
    try:
        return make_session(data, threads, provider)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own error types
        raise InputError(f"{label}: onnxruntime cannot load it on {short_name(provider)} "
                         f"({first_line(err)})") from None
