"""Where a model's time goes, from onnxruntime's profiler: per op type, per lowering, per conv kind.

onnxruntime profiles the graph it runs after its own optimisations, so a node's name there is
not always its name in the model:
- a fusion keeps the first node's name and adds a suffix (``<node>/MatMulAddFusion``,
  ``<node>/QuickGeluFusion/``);
- the NCHWc layout pass names a node after its output tensor (``<tensor>_nchwc``); a Conv
  fused with the Relu or BatchNormalization after it is named after *their* output, so the
  original model's conv names do not survive;
- nodes it creates get generated names (``ReorderInput_token_3``, ``gemm_input_reshape``,
  ``Transpose_token_12``).

Every node a lowering emits is named ``<conv>/convfc/<what>`` (``emit.py``) and fusions keep
that prefix, so the rewritten model's time goes to its convs by name. A node onnxruntime made
goes to a conv when every node it connects to in the optimised graph belongs to that conv;
the rest is "unattributed (onnxruntime-made)". Conv ops left in either model are grouped by
kind (depthwise, grouped, group-1 1x1, group-1 kxk), read from the optimised graph's
attributes since their names are gone. Times are node kernel times, mean per run, the first
run left out.
"""

from __future__ import annotations

import json
import os
import tempfile
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .families import FAMILIES, is_conv
from .graphs import all_nodes, graphs, inferred_shapes
from .io import InputError
from .report import Report
from .sessions import make_session

MARKER = "/convfc/"  # between a conv's name and what its lowering emitted (emit.py)
ORIGINAL_OPS = "original ops"
UNATTRIBUTED = "unattributed (onnxruntime-made)"
# onnxruntime's fused and layout variants of the conv ops, by the ONNX op whose inputs they keep
ORT_CONV_OPS = {"FusedConv": "Conv", "NhwcFusedConv": "Conv", "NhwcConv": "Conv",
                "NhwcQLinearConv": "QLinearConv", **{op: op for op in FAMILIES}}
CONTROL_FLOW = ("If", "Loop", "Scan")  # ops whose kernel time spans their bodies' nodes
SHOWN_CONVS = 12  # per-conv rows printed when lowerings are unknown; JSON has them all

Ops = dict  # op type -> ms per run


@dataclass
class Profiled:
    """One model's profile: ms per run of each node onnxruntime ran, and the graph it ran."""

    nodes: dict[str, tuple[str, float]]  # node name -> (op type, ms per run)
    optimized: onnx.ModelProto  # as onnxruntime optimised it; large weights not loaded
    run_ms: float  # mean wall time of a whole run, kernels and what lies between them
    threads: int
    runs: int

    @property
    def total(self) -> float:
        return sum(ms for _, ms in self.nodes.values())


def profile_nodes(model: onnx.ModelProto | str | bytes, feeds: Mapping[str, np.ndarray], *,
                  threads: int = 1, runs: int = 20,
                  provider: str = "CPUExecutionProvider") -> Profiled:
    """Profile ``runs`` runs (after one warm-up) with ``threads`` intra-op threads (0 =
    onnxruntime's choice), and keep the optimised graph for naming what ran."""
    with tempfile.TemporaryDirectory() as folder:
        def profiling(so: ort.SessionOptions) -> None:
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(folder) / "profile")
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name",
                "optimized.data")  # weights are never read back

        optimized_path = str(Path(folder) / "optimized.onnx")
        sess = make_session(model, threads, provider, optimized_path, configure=profiling)
        for _ in range(runs + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
        optimized = onnx.load(optimized_path, load_external_data=False)
    model_runs = sorted((e for e in events if e["name"] == "model_run"), key=lambda e: e["ts"])
    warm_from = model_runs[0]["ts"] + model_runs[0]["dur"]
    kernels = sorted((e for e in events if e.get("cat") == "Node" and e["ts"] >= warm_from
                      and e["name"].endswith("_kernel_time")), key=lambda e: e["ts"])
    nodes: dict[str, tuple[str, float]] = {}
    for event, own in zip(kernels, _own_times(kernels)):
        name, op = event["name"][:-len("_kernel_time")], event["args"]["op_name"]
        nodes[name] = (op, nodes.get(name, (op, 0.0))[1] + own / 1e3 / runs)
    run_ms = sum(e["dur"] for e in model_runs[1:]) / 1e3 / max(1, len(model_runs) - 1)
    return Profiled(nodes, optimized, run_ms, threads, runs)


def _own_times(kernels: list[dict]) -> list[float]:
    """Each kernel event's duration, less, for a control-flow node, the nodes of its bodies
    (they have events of their own, inside its span), so the nodes add up to the run.

    ``kernels`` sorted by start. Inner spans are shorter, so settling the shortest first
    gives each span the own time of everything inside: its children's whole durations.
    """
    own = [float(e["dur"]) for e in kernels]
    starts = [e["ts"] for e in kernels]
    flow = [i for i, e in enumerate(kernels) if e["args"]["op_name"] in CONTROL_FLOW]
    for i in sorted(flow, key=lambda i: kernels[i]["dur"]):
        end = kernels[i]["ts"] + kernels[i]["dur"]
        inside = range(bisect_left(starts, kernels[i]["ts"]), bisect_right(starts, end))
        nested = sum(own[j] for j in inside
                     if j != i and kernels[j]["ts"] + kernels[j]["dur"] <= end)
        own[i] = max(0.0, own[i] - nested)
    return own


@dataclass(frozen=True)
class Bucket:
    """A share of one model's time: a lowering, a conv kind, the original ops, ..."""

    label: str
    ops: Ops  # op type -> ms per run, largest first
    convs: int = 0  # how many convs it holds
    kind: str | None = None  # the conv kind of a bucket of conv ops (``conv_kind``)

    @property
    def ms(self) -> float:
        return sum(self.ops.values())


@dataclass(frozen=True)
class ConvTime:
    """The nodes one lowered conv became, in the rewritten model's profile."""

    conv: str
    kind: str  # of the conv in the original model, e.g. "Conv depthwise"
    lowering: str | None  # None when no rewrite report said
    ops: Ops

    @property
    def ms(self) -> float:
        return sum(self.ops.values())


@dataclass
class LoweringProfile:
    """Original and rewritten profiled side by side, the rewritten one per lowering."""

    threads: int
    runs: int
    original: list[Bucket]  # conv kinds, original ops, unattributed
    rewritten: list[Bucket]  # lowerings (a conv of unknown lowering alone), then the rest
    convs: list[ConvTime] = field(default_factory=list)  # slowest first
    run_ms: tuple[float, float] = (0.0, 0.0)  # whole-run wall time, original and rewritten
    # the rewritten model as onnxruntime optimised it (``Profiled.optimized``); not in to_dict
    optimized: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def totals(self) -> tuple[float, float]:
        return sum(b.ms for b in self.original), sum(b.ms for b in self.rewritten)

    def kinds(self) -> dict[str, tuple[float, float]]:
        """Conv kind -> ms in the original, ms in the rewritten (lowered or not)."""
        table: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for b in self.original:
            if b.kind:
                table[b.kind][0] += b.ms
        for c in self.convs:
            table[c.kind][1] += c.ms
        for b in self.rewritten:
            if b.kind:
                table[b.kind][1] += b.ms
        return {k: (v[0], v[1]) for k, v in sorted(table.items(), key=lambda kv: -kv[1][0])}

    def to_dict(self) -> dict:
        def rows(buckets: list[Bucket], total: float) -> list[dict]:
            return [{"label": b.label, "ms": b.ms, "share": b.ms / total if total else 0.0,
                     "convs": b.convs, "ops": b.ops} for b in buckets]
        original, rewritten = self.totals
        return {"threads": self.threads, "runs": self.runs,
                "original_ms": original, "rewritten_ms": rewritten,
                "original_run_ms": self.run_ms[0], "rewritten_run_ms": self.run_ms[1],
                "original": rows(self.original, original),
                "rewritten": rows(self.rewritten, rewritten),
                "kinds": [{"kind": k, "original_ms": o, "rewritten_ms": r}
                          for k, (o, r) in self.kinds().items()],
                "convs": [{"conv": c.conv, "kind": c.kind, "lowering": c.lowering,
                           "ms": c.ms, "ops": c.ops} for c in self.convs]}

    def render(self, console) -> None:
        for line in profile_lines(self.to_dict()):
            console.print(line, markup=False, highlight=False)


def profile_lines(data: Mapping) -> list[str]:
    """The tables of a ``LoweringProfile.to_dict()``: per lowering, per conv kind, compared."""
    threads = "default threads" if data["threads"] == 0 else f"{data['threads']} thread(s)"
    lines = [f"profile: {threads}, {data['runs']} runs, ms/run of node "
             f"kernel time (onnxruntime's profiler); whole runs {data['original_run_ms']:.3f} "
             f"ms original, {data['rewritten_run_ms']:.3f} ms rewritten"]
    lines += _bucket_table("rewritten, per lowering", data["rewritten"], data["rewritten_ms"])
    lines += _bucket_table("original, per conv kind", data["original"], data["original_ms"])
    return lines + _kind_table(data["kinds"], data["original_ms"], data["rewritten_ms"])


def break_down(original: onnx.ModelProto, rewritten: onnx.ModelProto, before: Profiled,
               after: Profiled, *, lowerings: Report | Mapping[str, str | None] | None = None,
               input_shapes: Iterable[tuple[str, tuple]] = ()) -> LoweringProfile:
    """Attribute the profiles of two models (``profile_nodes``): every node's time goes to
    exactly one bucket, so each model's buckets add up to its profiled total."""
    if isinstance(lowerings, Report):
        lowerings = {r.node: r.lowering for r in lowerings.rows}
    named = dict(lowerings or {})
    origins = _Origins(original, input_shapes)
    per_conv, rest = _attribute_rewritten(after, rewritten, origins)
    convs = sorted((ConvTime(name, origins.convs[name], named.get(name), _sorted(ops))
                    for name, ops in per_conv.items()), key=lambda c: -c.ms)
    return LoweringProfile(after.threads, after.runs, _attribute_original(before, original),
                           _per_lowering(convs) + rest, convs, (before.run_ms, after.run_ms),
                           after.optimized)


def _per_lowering(convs: list[ConvTime]) -> list[Bucket]:
    """One bucket per lowering, slowest first; a conv of unknown lowering alone, past
    ``SHOWN_CONVS`` of them one bucket for the rest."""
    groups: dict[str, list[ConvTime]] = defaultdict(list)
    hidden = sum(c.lowering is None for c in convs) - SHOWN_CONVS
    shown = 0
    for c in convs:  # slowest first
        if c.lowering is not None:
            groups[c.lowering].append(c)
            continue
        shown += 1
        label = f"{c.conv} ({c.kind}, lowering unknown)" if shown <= SHOWN_CONVS \
            else f"{hidden} more convs (lowering unknown)"
        groups[label].append(c)
    return _by_ms([Bucket(label, _sum_ops(c.ops for c in group), len(group))
                   for label, group in groups.items()])


def lowerings_from_json(path: str | os.PathLike) -> dict[str, str | None]:
    """Conv name -> lowering (None: skipped) from the JSON ``rewrite --report-json`` wrote."""
    try:
        convs = json.loads(Path(path).read_text())["convs"]
        return {str(c["node"]): c["lowering"] for c in convs}
    except OSError as err:
        raise InputError(f"{path}: cannot read the rewrite report ({err.strerror})") from None
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path}: not a rewrite report (expected the JSON that "
                         "'onnx-convfc rewrite --report-json' writes)") from None


def _attribute_original(profiled: Profiled, model: onnx.ModelProto) -> list[Bucket]:
    """Conv ops by kind, then the model's other ops, then the nodes onnxruntime made."""
    index = _Index(profiled.optimized)
    known = _Known(model)
    kinds = _ConvKinds()
    other: dict[str, Ops] = {ORIGINAL_OPS: defaultdict(float), UNATTRIBUTED: defaultdict(float)}
    for name, (op, ms) in profiled.nodes.items():
        if op in ORT_CONV_OPS:
            kinds.add(index.conv_kind(name, op), op, ms)
        else:
            other[ORIGINAL_OPS if known.node(name) else UNATTRIBUTED][op] += ms
    return kinds.buckets() + [Bucket(k, _sorted(ops)) for k, ops in other.items() if ops]


class _ConvKinds:
    """Conv ops onnxruntime ran, op type -> ms per conv kind, and how many nodes of each."""

    def __init__(self, suffix: str = "") -> None:
        self.suffix = suffix
        self.ops: dict[str, Ops] = defaultdict(lambda: defaultdict(float))
        self.count: dict[str, int] = defaultdict(int)

    def add(self, kind: str, op: str, ms: float) -> None:
        self.ops[kind][op] += ms
        self.count[kind] += 1

    def buckets(self) -> list[Bucket]:
        return _by_ms([Bucket(kind + self.suffix, _sorted(ops), self.count[kind], kind)
                       for kind, ops in self.ops.items()])


def _attribute_rewritten(profiled: Profiled, model: onnx.ModelProto, origins: _Origins
                         ) -> tuple[dict[str, Ops], list[Bucket]]:
    """Per lowered conv, op type -> ms; and the buckets of everything else.

    A name with the marker goes to the node before it (a conv, or a BatchNormalization made
    Mul + Add); a node onnxruntime made goes to the one conv all its neighbours belong to.
    """
    index = _Index(profiled.optimized)
    known = _Known(model)
    found = {name: known.node(name) for name in profiled.nodes}
    named = {name: origins.lowered_from(found[name] or name) for name in profiled.nodes}
    owner = dict(named)
    for name, (op, _) in profiled.nodes.items():
        if named[name] is None and not found[name] and op not in ORT_CONV_OPS:
            owner[name] = index.sole_owner(name, named)
    convs: dict[str, Ops] = defaultdict(lambda: defaultdict(float))
    rest: dict[str, Ops] = defaultdict(lambda: defaultdict(float))
    left = _ConvKinds(" (not lowered)")
    for name, (op, ms) in profiled.nodes.items():
        source = owner[name]
        if source in origins.convs:
            convs[source][op] += ms
        elif source is not None:
            rest[f"{origins.others[source]} (rewritten)"][op] += ms
        elif op in ORT_CONV_OPS:
            left.add(index.conv_kind(name, op), op, ms)
        else:
            rest[ORIGINAL_OPS if found[name] else UNATTRIBUTED][op] += ms
    order = {ORIGINAL_OPS: 1, UNATTRIBUTED: 2}
    buckets = sorted((Bucket(k, _sorted(ops)) for k, ops in rest.items()),
                     key=lambda b: (order.get(b.label, 0), -b.ms))
    return convs, left.buckets() + buckets


class _Origins:
    """The original nodes a rewrite may lower, by the name it gives them (``node.name`` or
    its first output), at any depth and in functions: conv-family ops with their kind, and
    BatchNormalizations (made Mul + Add after a lowered conv)."""

    def __init__(self, model: onnx.ModelProto, input_shapes: Iterable[tuple[str, tuple]]
                 ) -> None:
        nodes = all_nodes(model)
        # Conv weights are initializers but where computed at run time: only those are inferred.
        shapes = {t.name: tuple(t.dims) for g in graphs(model.graph) for t in g.initializer}
        missing = {_input(n, FAMILIES[n.op_type].weight) for n in nodes if is_conv(n)}
        missing -= shapes.keys() | {""}
        if missing:
            shapes.update(inferred_shapes(model, input_shapes, names=missing))
        self.convs: dict[str, str] = {}
        self.others: dict[str, str] = {}
        for node in nodes:
            name = node.name or (node.output[0] if node.output else "")
            if is_conv(node):
                weight = _input(node, FAMILIES[node.op_type].weight)
                self.convs[name] = conv_kind(node, shapes.get(weight))
            elif node.op_type == "BatchNormalization":
                self.others[name] = node.op_type
        self.known = self.convs.keys() | self.others.keys()

    def lowered_from(self, name: str) -> str | None:
        """The node a ``<node>/convfc/...`` name was emitted for: the longest known name that
        ends the text before a marker (onnxruntime may prefix the names it inlines)."""
        start = name.find(MARKER)
        while start >= 0:
            prefix = name[:start]
            if prefix in self.known:
                return prefix
            ends = [k for k in self.known if prefix.endswith(k)]
            if ends:
                return max(ends, key=len)
            start = name.find(MARKER, start + 1)
        return None


def conv_kind(node: onnx.NodeProto, weight_shape: tuple | None) -> str:
    """``Conv depthwise``, ``Conv grouped``, ``Conv group-1 1x1`` or ``Conv group-1 kxk``
    (the ONNX op first: ``ConvTranspose``, ``QLinearConv``, ...)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    group = attrs.get("group", 1)
    kernel = attrs.get("kernel_shape") or (weight_shape[2:] if weight_shape else None)
    if group > 1:
        single = weight_shape is not None and len(weight_shape) > 1 and weight_shape[1] == 1
        kind = "depthwise" if single else "grouped"
    elif not kernel or None in kernel:
        kind = "group-1"
    else:
        kind = "group-1 1x1" if all(k == 1 for k in kernel) else "group-1 kxk"
    return f"{ORT_CONV_OPS.get(node.op_type, node.op_type)} {kind}"


class _Known:
    """Finds the model node behind a name onnxruntime profiled: the same name, a fusion's
    ``<node>/<Fusion>`` or a layout pass's ``<output tensor>_nchwc``."""

    def __init__(self, model: onnx.ModelProto) -> None:
        nodes = [n for g in graphs(model.graph) for n in g.node]
        self.names = {n.name for n in nodes if n.name}
        self.producers = {out: n.name or out for n in nodes for out in n.output}

    def node(self, name: str) -> str | None:
        if name in self.names:
            return name
        if name.endswith("_nchwc") and name[:-len("_nchwc")] in self.producers:
            return self.producers[name[:-len("_nchwc")]]
        cut = name.rfind("/")
        while cut > 0:
            if name[:cut] in self.names:
                return name[:cut]
            cut = name.rfind("/", 0, cut)
        return None


class _Index:
    """The optimised graph onnxruntime ran: its nodes, producers and consumers by name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        every = list(graphs(model.graph))
        self.nodes = {n.name: n for g in every for n in g.node}
        self.shapes = {t.name: tuple(t.dims) for g in every for t in g.initializer}
        self.producer = {out: n.name for g in every for n in g.node for out in n.output}
        self.consumers: dict[str, list[str]] = defaultdict(list)
        for node in self.nodes.values():
            for name in node.input:
                self.consumers[name].append(node.name)

    def conv_kind(self, name: str, op: str) -> str:
        node = self.nodes.get(name)
        if node is None:
            return f"{ORT_CONV_OPS[op]} (kind unknown)"
        weight = _input(node, FAMILIES[ORT_CONV_OPS[op]].weight)
        return conv_kind(node, self.shapes.get(weight))

    def sole_owner(self, name: str, owner: Mapping[str, str | None]) -> str | None:
        """The conv every neighbour of ``name`` belongs to, if there is exactly one."""
        node = self.nodes.get(name)
        if node is None:
            return None
        around = [self.producer[t] for t in node.input if t in self.producer]
        around += [c for t in node.output for c in self.consumers.get(t, [])]
        owners = {owner.get(n) for n in around}
        return owners.pop() if len(owners) == 1 else None


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if index < len(node.input) else ""


def _sorted(ops: Mapping[str, float]) -> Ops:
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


def _sum_ops(all_ops: Iterable[Ops]) -> Ops:
    totals: Ops = defaultdict(float)
    for ops in all_ops:
        for op, ms in ops.items():
            totals[op] += ms
    return _sorted(totals)


def _by_ms(buckets: list[Bucket]) -> list[Bucket]:
    return sorted(buckets, key=lambda b: -b.ms)


def _bucket_table(title: str, buckets: list[dict], total: float) -> list[str]:
    labels = [f"{b['label']} ({b['convs']} convs)" if b["convs"] > 1 else b["label"]
              for b in buckets]
    width = max(len(label) for label in [title, *labels])
    lines = [f"{title:<{width + 2}} {'ms/run':>8} {'share':>6}  op types (ms/run)"]
    for label, b in zip(labels, buckets):
        ops = ", ".join(f"{op} {ms:.{2 if ms >= 0.1 else 3}f}" for op, ms in b["ops"].items())
        lines.append(f"  {label:<{width}} {b['ms']:>8.3f} {b['share']:>6.1%}  {ops}")
    return lines + [f"  {'total':<{width}} {total:>8.3f}"]


def _kind_table(kinds: list[dict], original: float, rewritten: float) -> list[str]:
    convs = (sum(k["original_ms"] for k in kinds), sum(k["rewritten_ms"] for k in kinds))
    rows = [(k["kind"], k["original_ms"], k["rewritten_ms"]) for k in kinds]
    rows += [("all convs", *convs),
             ("everything else", original - convs[0], rewritten - convs[1]),
             ("total", original, rewritten)]
    width = max(len(row[0]) for row in rows)
    lines = [f"{'convs by kind':<{width + 2}} {'original ms':>11} {'rewritten ms':>12} "
             f"{'ratio':>6}"]
    for kind, o, r in rows:
        ratio = f"{r / o:>6.2f}" if o else f"{'-':>6}"
        lines.append(f"  {kind:<{width}} {o:>11.3f} {r:>12.3f} {ratio}")
    return lines + ["  (the original's convs include the activations, BatchNormalizations and "
                    "residual Adds onnxruntime fused into them)"]
