"""Reading a model's graphs: walking nested bodies, the constants a graph sees, inferred shapes.

Shared by the stages that look at a model without changing it (``prepare``, ``rewrite``,
``explain``, ``parity``, ``io``), so each asks the same questions the same way.
"""

from __future__ import annotations

import copy
from collections import ChainMap
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Union

import numpy as np
import onnx
from onnx import (
    AttributeProto,
    FunctionProto,
    GraphProto,
    ModelProto,
    NodeProto,
    TensorProto,
    TypeProto,
    ValueInfoProto,
    numpy_helper,
)

# STANDARD_DOMAINS (the default ONNX domain, by both of its names) is skeleton's, read here.
from .skeleton import STANDARD_DOMAINS, Constant, TensorStore, weightless_copy

# The ops of that domain that have graph attributes (a test keeps this in step with onnx.defs).
# Another op of the domain holding a graph breaks the ONNX rules (the checker refuses it), so
# walks do not read its attributes: that cost more than the rest of a walk.
GRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
# The same for tensor attributes.
TENSOR_OPS = frozenset({"Constant", "ConstantOfShape"})

Shape = tuple  # of int | None
Holder = Union[GraphProto, FunctionProto]


def subgraphs(node: NodeProto) -> Iterable[GraphProto]:
    """The bodies of one node (If branches, Loop and Scan bodies), not their own bodies."""
    if node.op_type in GRAPH_OPS or node.domain not in STANDARD_DOMAINS:
        return _graph_attributes(node)
    return ()


def _graph_attributes(node: NodeProto) -> Iterator[GraphProto]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        yield from attr.graphs


def graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """``graph`` and every graph nested in it, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from graphs(sub)


def all_nodes(model: ModelProto) -> list[NodeProto]:
    """The nodes of every graph, nested ones too, then those of the model-local functions."""
    return [n for g in graphs(model.graph) for n in g.node] + \
        [n for f in model.functions for n in f.node]


def bodies(node: NodeProto, scope: str) -> Iterable[tuple[GraphProto, str]]:
    """The node's bodies with their report labels: ``<scope>/<node>.<attribute>[<i>]``."""
    if node.op_type in GRAPH_OPS or node.domain not in STANDARD_DOMAINS:
        return _labelled_bodies(node, scope)
    return ()


def _labelled_bodies(node: NodeProto, scope: str) -> Iterator[tuple[GraphProto, str]]:
    for attr in node.attribute:
        label = f"{scope}/{node.name or node.op_type}.{attr.name}"
        if attr.type == AttributeProto.GRAPH:
            yield attr.g, label
        for i, sub in enumerate(attr.graphs):
            yield sub, f"{label}[{i}]"


def scoped_graphs(graph: GraphProto, scope: str = "main") -> Iterator[tuple[GraphProto, str]]:
    """``graphs`` with the label of each (``bodies``)."""
    yield graph, scope
    for node in graph.node:
        for sub, label in bodies(node, scope):
            yield from scoped_graphs(sub, label)


def constants(holder: Holder, store: TensorStore | None = None) -> dict[str, Constant]:
    """Name -> TensorProto (or array) of the initializers (graphs only) and of the ``Constant``
    nodes holding a tensor; a placeholder's data comes from ``store``."""
    def data(name: str, tensor):
        return store.get(name, tensor) if store is not None else tensor

    found = {t.name: data(t.name, t) for t in holder.initializer} \
        if isinstance(holder, GraphProto) else {}
    for node in holder.node:
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == AttributeProto.TENSOR:
                    found[node.output[0]] = data(node.output[0], attr.t)
    return found


def visible(own: dict[str, Constant], outer: Mapping[str, Constant]) -> Mapping[str, Constant]:
    """The constants a graph sees: its own, then its enclosing graphs' (a plain dict for the
    main graph: a ``ChainMap`` lookup costs several times a dict's, and a rewrite does many)."""
    return ChainMap(own, outer) if outer else own


def constant_array(name: str, consts: Mapping[str, Constant]) -> np.ndarray | None:
    """The value of constant ``name`` as an array, ``None`` when it is not a constant."""
    value = consts.get(name)
    if value is None or isinstance(value, np.ndarray):
        return value
    return numpy_helper.to_array(value)


def inferred_shapes(model: ModelProto, input_shapes: Iterable[tuple[str, tuple[int, ...]]] = (),
                    weightless: bool = False,
                    names: Collection[str] | None = None) -> dict[str, Shape]:
    """Name -> shape (``None`` for unknown dims) of every typed value in the model (of those
    in ``names`` when given), with the graph inputs named in ``input_shapes`` fixed first.

    Inference runs on a weightless copy (it serialises the model it is given, weights too),
    or on ``model`` itself when it is ``weightless`` already (the inputs it fixes get their
    declared types back afterwards).
    """
    overrides = dict(input_shapes)
    probe = model if weightless else weightless_copy(model)[0]
    declared: list[tuple[ValueInfoProto, TypeProto | None]] = []  # to restore in ``model``
    try:
        for value in probe.graph.input:
            if value.name in overrides:
                if weightless:
                    declared.append(
                        (value, copy.deepcopy(value.type) if value.HasField("type") else None))
                dims = value.type.tensor_type.shape.dim
                del dims[:]
                for d in overrides[value.name]:
                    dims.add().dim_value = d
        try:
            probe = onnx.shape_inference.infer_shapes(probe, data_prop=True)
        except Exception:  # noqa: BLE001 - inference is best effort; unknown shapes stay dynamic
            pass
    finally:
        for value, declared_type in declared:
            if declared_type is None:
                value.ClearField("type")
            else:
                value.type.CopyFrom(declared_type)
    # Only the shapes asked for are read: reading every dim cost more than inferring them.
    shapes: dict[str, Shape] = {}
    for graph in graphs(probe.graph):
        # Inference gives initializers no value_info; a conv may read one as its data input.
        for entry in (*graph.initializer, *graph.input, *graph.value_info, *graph.output):
            if names is None or entry.name in names:
                shape = _shape(entry)
                if shape is not None:
                    shapes[entry.name] = shape
    return shapes


def _shape(entry: TensorProto | ValueInfoProto) -> Shape | None:
    """An initializer's dims, or a typed value's shape; ``None`` when it has none."""
    if isinstance(entry, TensorProto):
        return tuple(entry.dims)
    t = entry.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(  # a declared 0 is a size (an empty axis)
        d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
        for d in t.shape.dim)
