"""Lower the convs of an onnx-graphsurgeon ``Graph`` that a pipeline already holds.

``lower_convs(graph)`` is a plain function and the main API. ``register_graph_method()``
is an opt-in that makes it callable as ``graph.lower_convs(...)`` on every ``gs.Graph``;
importing this module registers nothing.

Example::

    import onnx_graphsurgeon as gs
    from onnx_convfc.graphsurgeon import lower_convs

    graph = gs.import_onnx(model)
    report = lower_convs(graph, method="im2col")
    graph.cleanup().toposort()
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from . import rewrite_model
from .options import RewriteOptions
from .report import Report


def lower_convs(graph: gs.Graph, options: RewriteOptions | None = None,
                **overrides) -> Report:
    """Lower every conv of a top-level ``graph`` into MatMul form, in place.

    The graph is exported to a ``ModelProto``, rewritten by ``rewrite_model`` and imported
    back; then ``graph`` takes over the rewritten nodes, inputs, outputs, opset and local
    functions. The ``graph`` object itself stays the one the caller holds, so a pipeline
    goes on with it, but every node and tensor in it is a new object: look tensors up again
    by name (``graph.tensors()[name]``) rather than through references taken before the call.
    Tensor names are kept: each conv's output keeps its name.

    Args:
        graph: the graph to rewrite (a model's main graph, not a subgraph of a node).
        options: the rewrite options; keyword ``overrides`` replace single fields, exactly
            as in ``rewrite_model``.

    Returns:
        The ``Report`` of the rewrite, one row per conv.
    """
    rewritten, report = rewrite_model(gs.export_onnx(graph), options, **overrides)
    imported = gs.import_onnx(rewritten)
    # All attributes, not a chosen few: gs shares one function list between a graph and
    # its subgraphs, and the imported graph's subgraphs point at the imported list.
    vars(graph).update(vars(imported))
    return report


def register_graph_method() -> None:
    """Opt in: make ``graph.lower_convs(options=None, **overrides)`` work on every ``gs.Graph``.

    Uses graphsurgeon's own ``gs.Graph.register()``; calling it again is harmless.
    """
    gs.Graph.register()(lower_convs)
