"""Walk a model (main graph, If/Loop/Scan bodies, local functions) and lower each conv.

Every op of the conv family (``families.py``: Conv, ConvTranspose, ConvInteger, QLinearConv)
goes through: its operands (constants, or ``Runtime`` tensors the graph computes), its spec
builder (geometry), ``plan.choose`` (which lowering, or why not), the lowering's ``emit``
(replacement nodes, output name preserved). Replaced nodes are
swapped in place, so the topological order of the graph is kept.
"""

from __future__ import annotations

import time
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, numpy_helper

from .conv import SpecError
from .emit import ConstantPool, Emitter, NameScope
from .families import FAMILIES, Family
from .lowering.operands import Operand, Runtime, is_runtime, shape_of
from .options import RewriteOptions
from .plan import choose, dtype_refusal
from .prepare import prepare_model
from .report import ConvRow, Report

CONV_DOMAINS = ("", "ai.onnx")

Shape = tuple  # of int | None


@dataclass
class _Context:
    options: RewriteOptions
    shapes: dict[str, Shape]
    names: NameScope
    report: Report
    replaced_inputs: set[str] = field(default_factory=set)


def rewrite(model: ModelProto, options: RewriteOptions) -> tuple[ModelProto, Report]:
    """Return a rewritten copy of ``model`` and the report of what was done."""
    started = time.perf_counter()
    report = Report()
    model, notes = prepare_model(model, options)
    report.notes.extend(notes)
    ctx = _Context(options, _inferred_shapes(model, options), NameScope(_all_names(model)), report)
    _rewrite_graph(model.graph, "main", {}, ctx)
    for function in model.functions:
        _rewrite_function(function, ctx)
    _drop_unused_constants(model, ctx.replaced_inputs)
    report.seconds = time.perf_counter() - started
    return model, report


def _rewrite_graph(graph: GraphProto, scope: str, outer: Mapping, ctx: _Context) -> None:
    consts = ChainMap(_constants(graph.initializer, graph.node), outer)
    pool = ConstantPool(ctx.names, in_function=False)
    new_nodes = []
    for node in graph.node:
        for attr in node.attribute:
            label = f"{scope}/{node.name or node.op_type}.{attr.name}"
            if attr.type == AttributeProto.GRAPH:
                _rewrite_graph(attr.g, label, consts, ctx)
            for i, sub in enumerate(attr.graphs):
                _rewrite_graph(sub, f"{label}[{i}]", consts, ctx)
        new_nodes.extend(_lower_if_conv(node, consts, pool, scope, ctx))
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    graph.initializer.extend(pool.initializers)


def _rewrite_function(function: FunctionProto, ctx: _Context) -> None:
    consts = _constants((), function.node)
    pool = ConstantPool(ctx.names, in_function=True)
    scope = f"function {function.domain}.{function.name}"
    new_nodes = []
    for node in function.node:
        new_nodes.extend(_lower_if_conv(node, consts, pool, scope, ctx))
    function.ClearField("node")
    function.node.extend(pool.constant_nodes + new_nodes)


def _lower_if_conv(node: NodeProto, consts: Mapping, pool: ConstantPool, scope: str,
                   ctx: _Context) -> list[NodeProto]:
    family = FAMILIES.get(node.op_type)
    if family is None or node.domain not in CONV_DOMAINS:
        return [node]
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
    try:
        spec = family.build(node, name, shape_of(weight), ctx.shapes.get(node.input[0]),
                            operands)
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
    decision = choose(spec, ctx.options, itemsize, lowerings, auto_order)
    if decision.lowering is None:
        return skip(decision.reason)

    em = Emitter(name, pool, ctx.options)
    lowerings[decision.lowering].emit(spec, weight, bias, em)
    row["lowering"] = decision.lowering
    row["weight_bytes_after"] = em.const_bytes
    ctx.report.rows.append(ConvRow(reason=None, note=decision.note, **row))
    ctx.replaced_inputs.update(node.input[1:])
    return em.nodes


def _operands(node: NodeProto, family: Family, consts: Mapping,
              ctx: _Context) -> dict[str, Operand | None] | str:
    """Role -> constant array or ``Runtime`` tensor (``None`` if absent), or why not."""
    found: dict[str, Operand | None] = {}
    for role, index in family.roles():
        tensor = node.input[index] if index < len(node.input) else ""
        value = _constant_array(tensor, consts) if tensor else None
        if tensor and value is None:
            shape = ctx.shapes.get(tensor)
            if ctx.options.skip_runtime_weights:
                return f"{role} '{tensor}' is not constant"
            if shape is None or None in shape:
                return f"{role} '{tensor}' is not constant and its shape is not known statically"
            value = Runtime(tensor, tuple(shape))
        found[role] = value
    return found


def _constants(initializers, nodes) -> dict:
    """Name -> TensorProto for initializers and ``Constant`` nodes holding a tensor."""
    found = {t.name: t for t in initializers}
    for node in nodes:
        if node.op_type == "Constant" and node.domain in CONV_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == AttributeProto.TENSOR:
                    found[node.output[0]] = attr.t
    return found


def _constant_array(name: str, consts: Mapping) -> np.ndarray | None:
    tensor = consts.get(name)
    return None if tensor is None else numpy_helper.to_array(tensor)


def _inferred_shapes(model: ModelProto, options: RewriteOptions) -> dict[str, Shape]:
    """Name -> shape (``None`` for unknown dims) of every typed value in the model."""
    probe = model
    if options.input_shapes:
        probe = ModelProto()
        probe.CopyFrom(model)
        overrides = dict(options.input_shapes)
        for value in probe.graph.input:
            if value.name in overrides:
                dims = value.type.tensor_type.shape.dim
                new = overrides[value.name]
                del dims[:]
                for d in new:
                    dims.add().dim_value = d
    try:
        probe = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown shapes stay dynamic
        pass
    shapes: dict[str, Shape] = {}
    for graph in _graphs(probe.graph):
        for value in (*graph.input, *graph.value_info, *graph.output):
            t = value.type.tensor_type
            if t.HasField("shape"):
                shapes[value.name] = tuple(
                    d.dim_value if d.dim_value > 0 else None for d in t.shape.dim)
    return shapes


def _graphs(graph: GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _all_names(model: ModelProto) -> set[str]:
    names: set[str] = set()
    bodies = [*_graphs(model.graph)]
    for graph in bodies:
        names.update(t.name for t in graph.initializer)
        names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    nodes = [n for g in bodies for n in g.node] + [n for f in model.functions for n in f.node]
    for graph_node in nodes:
        names.add(graph_node.name)
        names.update(graph_node.input)
        names.update(graph_node.output)
    return names


def _drop_unused_constants(model: ModelProto, candidates: set[str]) -> None:
    """Remove the original weights and biases that no node reads any more."""
    bodies = [*_graphs(model.graph)]
    used: set[str] = {o.name for o in model.graph.output}
    for graph in bodies:
        used.update(i for n in graph.node for i in n.input)
    for function in model.functions:
        used.update(i for n in function.node for i in n.input)
        used.update(function.output)
    dead = candidates - used
    for graph in bodies:
        kept = [t for t in graph.initializer if t.name not in dead]
        if len(kept) != len(graph.initializer):
            graph.ClearField("initializer")
            graph.initializer.extend(kept)
        _drop_constant_nodes(graph, dead)
    for function in model.functions:
        _drop_constant_nodes(function, dead)


def _drop_constant_nodes(holder, dead: set[str]) -> None:
    kept = [n for n in holder.node if not (n.op_type == "Constant" and n.output[0] in dead)]
    if len(kept) != len(holder.node):
        holder.ClearField("node")
        holder.node.extend(kept)
