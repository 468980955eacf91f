"""Walk a model (main graph, If/Loop/Scan bodies, local functions) and lower each conv.

Every op of the conv family (``families.py``: Conv, ConvTranspose, ConvInteger, QLinearConv)
goes through: its operands (constants, or ``Runtime`` tensors the graph computes), its spec
builder (geometry), ``plan.choose`` (which lowering, or why not), the lowering's ``emit``
(replacement nodes, output name preserved). Replaced nodes are
swapped in place, so the topological order of the graph is kept.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from itertools import chain

import numpy as np
from onnx import FunctionProto, GraphProto, ModelProto, NodeProto

from .batchnorm import Affine, as_affine, emit_affine, fold, is_batchnorm
from .budget import charge, check_input_size, estimate
from .conv import SpecError
from .emit import ConstantPool, Emitter, NameScope
from .families import FAMILIES, Family, is_conv
from .graphs import (
    Shape,
    all_nodes,
    bodies,
    constant_array,
    constants,
    graphs,
    inferred_shapes,
    visible,
)
from .lowering.operands import Operand, Runtime, is_runtime, shape_of
from .objective import LatencyObjective
from .options import RewriteOptions
from .plan import choose, dtype_refusal, onnxruntime_refuses
from .prepare import default_opset, prepare
from .report import ConvRow, Report
from .skeleton import TensorStore


@dataclass
class _Context:
    options: RewriteOptions
    shapes: dict[str, Shape]
    names: NameScope
    report: Report
    store: TensorStore  # the data of the weightless model's placeholders
    readers: Counter  # name -> how many nodes (and graph outputs) read it
    dead: set[str] = field(default_factory=set)  # constants nothing reads any more
    folded_bns: list[tuple[str, str]] = field(default_factory=list)  # (conv, BN output)
    affine_bns: int = 0  # BNs made Mul + Add
    opset: int | None = None  # the model's default-domain opset, after preparing
    added_bytes: int = 0  # estimated, for --max-output-bytes (``budget.py``)
    objective: LatencyObjective | None = None  # --objective latency


def rewrite(model: ModelProto, options: RewriteOptions) -> tuple[ModelProto, Report]:
    """Return a rewritten copy of ``model`` and the report of what was done."""
    started = time.perf_counter()
    report = Report()
    prepared = prepare(model)
    model = prepared.model
    report.notes.extend(prepared.notes)
    names, readers, conv_inputs = _survey(model)
    shapes = inferred_shapes(model, options.input_shapes, weightless=True, names=conv_inputs)
    ctx = _Context(options, shapes, NameScope(names), report, prepared.store, readers,
                   opset=default_opset(model),
                   objective=LatencyObjective(options) if options.objective == "latency"
                   else None)
    _rewrite_graph(model.graph, "main", {}, ctx, prepared.store)
    for function in model.functions:
        _rewrite_function(function, ctx)
    _drop_constants(model, ctx.dead)
    prepared.store.fill(model.graph)
    report.notes.extend(_batchnorm_notes(ctx))
    if ctx.objective is not None:
        report.notes.extend(ctx.objective.finish())
    report.seconds = time.perf_counter() - started
    return model, report


def _rewrite_graph(graph: GraphProto, scope: str, outer: Mapping, ctx: _Context,
                   store: TensorStore | None = None) -> None:
    """``store``: where the data of ``graph``'s placeholders is (the main graph's)."""
    consts = visible(constants(graph, store), outer)
    pool = ConstantPool(ctx.names, graph)
    bns = _BatchNorms.of(graph.node, ctx.options)
    new_nodes = []
    for node in graph.node:
        for sub, label in bodies(node, scope):
            _rewrite_graph(sub, label, consts, ctx)
        if bns.by_input and is_batchnorm(node):
            new_nodes.extend(_after_lowered_conv(node, consts, pool, ctx, bns))
        else:
            new_nodes.extend(_lower_if_conv(node, consts, pool, scope, ctx, bns))
    if len(new_nodes) != len(graph.node) or any(a is not b for a, b in zip(new_nodes, graph.node)):
        graph.ClearField("node")
        graph.node.extend(new_nodes)


def _rewrite_function(function: FunctionProto, ctx: _Context) -> None:
    consts = constants(function)
    pool = ConstantPool(ctx.names, None)
    scope = f"function {function.domain}.{function.name}"
    new_nodes = []
    for node in function.node:
        new_nodes.extend(_lower_if_conv(node, consts, pool, scope, ctx))
    function.ClearField("node")
    function.node.extend(pool.constant_nodes + new_nodes)


@dataclass
class _BatchNorms:
    """The BatchNormalizations of one graph, by the tensor they read, and the outputs of the
    graph's lowered convs: (rank, dtype) of each."""

    by_input: dict[str, NodeProto]
    lowered: dict[str, tuple[int, np.dtype]] = field(default_factory=dict)
    folded: set[str] = field(default_factory=set)  # outputs of BNs folded into their conv

    @classmethod
    def of(cls, nodes, options: RewriteOptions) -> _BatchNorms:
        if options.batchnorm == "keep":
            return cls({})
        return cls({n.input[0]: n for n in nodes if is_batchnorm(n) and n.input})


def _after_lowered_conv(node: NodeProto, consts: Mapping, pool: ConstantPool, ctx: _Context,
                        bns: _BatchNorms) -> list[NodeProto]:
    """A BatchNormalization: gone when folded into its conv, Mul + Add after a lowered conv."""
    if node.output[0] in bns.folded:
        _release(ctx, [t for t in node.input[1:] if t in consts])
        return []
    if node.input[0] not in bns.lowered:
        return [node]
    rank, dtype = bns.lowered[node.input[0]]
    bn = as_affine(node, lambda name: constant_array(name, consts), dtype)
    if bn is None:
        return [node]
    em = Emitter(bn.label, pool, ctx.options, ctx.opset)
    emit_affine(bn, rank, dtype, em)
    _release(ctx, [t for t in node.input[1:] if t in consts])
    ctx.affine_bns += 1
    return em.nodes


def _folded_batchnorm(node: NodeProto, spec, weight: Operand, bias: Operand | None,
                      consts: Mapping, ctx: _Context, bns: _BatchNorms | None) -> Affine | None:
    """The BN that alone reads this conv's output, when it can be folded into the conv."""
    bn_node = bns.by_input.get(node.output[0]) if bns else None
    if bn_node is None or ctx.options.batchnorm != "fold" or node.op_type != "Conv" \
            or ctx.readers[node.output[0]] != 1 or not isinstance(weight, np.ndarray) \
            or is_runtime(bias):
        return None
    bn = as_affine(bn_node, lambda name: constant_array(name, consts), weight.dtype)
    return bn if bn is not None and bn.channels == spec.out_channels else None


def _batchnorm_notes(ctx: _Context) -> list[str]:
    notes = []
    if ctx.folded_bns:
        conv, output = ctx.folded_bns[0]
        notes.append(f"folded {len(ctx.folded_bns)} BatchNormalization(s) into the lowered conv "
                     f"before each; those convs now write the BN's output (e.g. conv '{conv}' "
                     f"writes '{output}'), their own output names are gone (--batchnorm affine "
                     "keeps every name)")
    if ctx.affine_bns:
        notes.append(f"made {ctx.affine_bns} BatchNormalization(s) after lowered convs Mul + "
                     "Add (onnxruntime cannot fold them into a MatMul)")
    return notes


def _lower_if_conv(node: NodeProto, consts: Mapping, pool: ConstantPool, scope: str,
                   ctx: _Context, bns: _BatchNorms | None = None) -> list[NodeProto]:
    if not is_conv(node):
        return [node]
    family = FAMILIES[node.op_type]
    name = node.name or node.output[0]
    row = dict(node=name, op_type=node.op_type, scope=scope, geometry="?", lowering=None,
               weight_bytes_before=0, weight_bytes_after=0)

    def skip(reason: str) -> list[NodeProto]:
        ctx.report.rows.append(ConvRow(reason=reason, **row))
        return [node]

    if len(node.input) < family.required or len(node.output) != 1 \
            or not node.input[family.weight]:
        return skip(f"malformed {node.op_type} node (needs {family.required} inputs, "
                    "a weight and one output)")
    operands = _operands(node, family, consts, ctx)
    if isinstance(operands, str):
        return skip(operands)
    weight, bias = operands.pop("weight"), operands.pop("bias", None)
    values = [v for v in (weight, bias, *operands.values()) if v is not None]
    runtime = any(is_runtime(v) for v in values)
    row["weights"] = "runtime" if runtime else "constant"
    row["weight_bytes_before"] = sum(v.nbytes for v in values if isinstance(v, np.ndarray))
    input_shape = ctx.shapes.get(node.input[0])
    try:
        spec = family.build(node, name, shape_of(weight), input_shape, operands)
    except SpecError as err:
        return skip(f"invalid conv: {err}")
    if bias is not None and shape_of(bias) != (spec.out_channels,):
        return skip(f"bias shape {list(shape_of(bias))} is not [{spec.out_channels}]")
    row["geometry"] = spec.short()
    if family.float_weights and isinstance(weight, np.ndarray):
        refusal = dtype_refusal(weight.dtype)
        if refusal:
            return skip(refusal)
    lowerings, auto_order = family.tables(runtime)
    itemsize = weight.dtype.itemsize if isinstance(weight, np.ndarray) else 4
    pick = ctx.objective and ctx.objective.picker(node.op_type, weight, input_shape, ctx.opset)
    decision = choose(spec, ctx.options, itemsize, lowerings, auto_order, pick)
    if decision.lowering is None:
        return skip(decision.reason)

    lowering = lowerings[decision.lowering]
    check_input_size(spec, name)
    ctx.added_bytes = charge(ctx.added_bytes, estimate(lowering, spec, itemsize, ctx.options),
                             name, decision.lowering, ctx.options.max_output_bytes)
    note = decision.note
    bn = _folded_batchnorm(node, spec, weight, bias, consts, ctx, bns)
    folded = fold(weight, bias, bn) if bn is not None else None
    if folded is not None:
        weight, bias = folded
        spec = replace(spec, output=bn.node.output[0])
        bns.folded.add(spec.output)
        ctx.folded_bns.append((name, spec.output))
        note = "; ".join(filter(None, [note, f"BatchNormalization '{bn.label}' folded in"]))
    em = Emitter(name, pool, ctx.options, ctx.opset)
    lowering.emit(spec, weight, bias, em)
    if bns is not None and family.float_weights and isinstance(weight, np.ndarray):
        bns.lowered[spec.output] = (weight.ndim, weight.dtype)
    row["lowering"] = decision.lowering
    row["weight_bytes_after"] = em.const_bytes
    ctx.report.rows.append(ConvRow(reason=None, note=note, fallback=decision.fallback, **row))
    refusal = onnxruntime_refuses(node.op_type, spec, getattr(weight, "dtype", None))
    if refusal:
        ctx.report.notes.append(f"conv '{name}': {refusal}, so the original cannot run there; "
                                "it was lowered per the ONNX spec (--verify compares it with "
                                "onnx.reference)")
    _release(ctx, [t for t in node.input[1:] if t in consts])
    return em.nodes


def _release(ctx: _Context, constants: list[str]) -> None:
    """One reader fewer for each of ``constants``; one that nothing reads any more is dead,
    and its data goes now (a folded weight's array), not after the whole rewrite."""
    for name in constants:
        ctx.readers[name] -= 1
        if ctx.readers[name] <= 0:
            ctx.store.forget(name)
            ctx.dead.add(name)


def _operands(node: NodeProto, family: Family, consts: Mapping,
              ctx: _Context) -> dict[str, Operand | None] | str:
    """Role -> constant array or ``Runtime`` tensor (``None`` if absent), or why not."""
    found: dict[str, Operand | None] = {}
    for role, index in family.roles():
        tensor = node.input[index] if index < len(node.input) else ""
        value = constant_array(tensor, consts) if tensor else None
        if tensor and value is None:
            shape = ctx.shapes.get(tensor)
            if ctx.options.skip_runtime_weights:
                return f"{role} '{tensor}' is not constant"
            if shape is None or None in shape:
                return f"{role} '{tensor}' is not constant and its shape is not known statically"
            value = Runtime(tensor, tuple(shape))
        found[role] = value
    return found


def _survey(model: ModelProto) -> tuple[set[str], Counter, set[str]]:
    """Every name in the model, how many nodes and graph outputs read each tensor, and the
    tensors the conv-family nodes read (the shapes a rewrite asks for), at any depth."""
    names: set[str] = set()
    readers: Counter = Counter()
    for graph in graphs(model.graph):
        names.update(t.name for t in graph.initializer)
        names.update(v.name for v in (*graph.input, *graph.value_info))
        readers.update(v.name for v in graph.output)
    nodes = all_nodes(model)
    names.update(n.name for n in nodes)
    names.update(chain.from_iterable(n.output for n in nodes))
    readers.update(chain.from_iterable(n.input for n in nodes))  # one call: it costs per call
    for function in model.functions:
        readers.update(function.output)
    names.update(readers)
    conv_inputs = set(chain.from_iterable(n.input for n in nodes if is_conv(n)))
    return names, readers, conv_inputs


def _drop_constants(model: ModelProto, dead: set[str]) -> None:
    """Remove the initializers and ``Constant`` nodes of these names, at any depth."""
    for graph in graphs(model.graph):
        _delete(graph.initializer, lambda t: t.name in dead)
        _delete(graph.node, lambda n: n.op_type == "Constant" and n.output[0] in dead)
    for function in model.functions:
        _delete(function.node, lambda n: n.op_type == "Constant" and n.output[0] in dead)


def _delete(items, doomed) -> None:
    """Delete in place: rebuilding the list would copy every kept item, weights included."""
    for k in reversed([k for k, item in enumerate(items) if doomed(item)]):
        del items[k]
