"""Shared test helpers, given to tests as fixtures: a numpy reference convolution and the
checks every rewritten model must pass."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

from onnx_convfc.lowering.patches import WEIGHT_LEFT_NODE


def onnx_same_pads(size: int, kernel: int, stride: int, dilation: int,
                   upper: bool) -> tuple[int, int]:
    """(begin, end) of ``auto_pad=SAME_*`` as the ONNX Conv spec words it."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
    odd = total % 2
    half = total // 2
    return (half, half + odd) if upper else (half + odd, half)


def resolve_pads(spatial, kernel, strides, dilations, pads=None,
                 auto_pad: str = "NOTSET") -> list[int]:
    """Explicit ``begins + ends`` for a conv at one input size."""
    r = len(kernel)
    if auto_pad == "VALID":
        return [0] * (2 * r)
    if auto_pad.startswith("SAME"):
        pairs = [onnx_same_pads(s, k, st, d, auto_pad == "SAME_UPPER")
                 for s, k, st, d in zip(spatial, kernel, strides, dilations)]
        return [p[0] for p in pairs] + [p[1] for p in pairs]
    return list(pads) if pads is not None else [0] * (2 * r)


def conv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, strides, dilations,
                   pads, group: int) -> np.ndarray:
    """ONNX Conv in float64 numpy: one einsum per kernel offset (vectorised over positions)."""
    r = w.ndim - 2
    x = np.pad(x.astype(np.float64),
               [(0, 0), (0, 0)] + [(pads[i], pads[i + r]) for i in range(r)])
    n, c = x.shape[:2]
    m, c_g = w.shape[:2]
    kernel = w.shape[2:]
    out = [(x.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
           for i in range(r)]
    xg = x.reshape(n, group, c_g, *x.shape[2:])
    wg = w.astype(np.float64).reshape(group, m // group, c_g, *kernel)
    y = np.zeros((n, group, m // group, *out))
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(o * d, o * d + (size - 1) * s + 1, s)
                       for o, d, s, size in zip(offset, dilations, strides, out))
        y += np.einsum("ngc...,gmc->ngm...", xg[(slice(None),) * 3 + window],
                       wg[(slice(None),) * 3 + offset])
    y = y.reshape(n, m, *out)
    if b is not None:
        y += b.astype(np.float64).reshape(1, m, *[1] * r)
    return y


def assert_close(out: np.ndarray, ref: np.ndarray, rel: float, what: str = "") -> None:
    """``max|out - ref| <= rel * max(1, max|ref|)``, with the numbers in the message."""
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != reference {ref.shape}"
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    err = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max(initial=0.0))
    assert err <= rel * scale, f"{what}: max_abs={err:.3g} > {rel:g} * scale {scale:.3g}"


def _conv_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


def _is_depthwise(conv: onnx.NodeProto, model: onnx.ModelProto) -> bool:
    """One input channel per group, more than one group."""
    group = next((a.i for a in conv.attribute if a.name == "group"), 1)
    weight = next(t for t in model.graph.initializer if t.name == conv.input[1])
    return group > 1 and weight.dims[1] == 1


def check_rewritten(original: onnx.ModelProto, rewritten: onnx.ModelProto, report,
                    lowered: bool = True) -> None:
    """What must hold for any rewrite of a main-graph-only model.

    ``lowered``: every conv was expected to be rewritten (else none was).
    """
    onnx.checker.check_model(rewritten, full_check=True)
    convs = _conv_nodes(original)
    assert len(report.rows) == len(convs)
    assert all(bool(r.lowering) == lowered for r in report.rows), [r.reason for r in report.rows]
    left = _conv_nodes(rewritten)
    assert len(left) == (0 if lowered else len(convs))

    # nothing outside the convs changes
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version",
                  "doc_string"):
        assert getattr(rewritten, field) == getattr(original, field), field
    assert list(rewritten.opset_import) == list(original.opset_import)
    assert list(rewritten.metadata_props) == list(original.metadata_props)
    assert rewritten.graph.name == original.graph.name
    assert rewritten.graph.doc_string == original.graph.doc_string
    assert list(rewritten.graph.input) == list(original.graph.input)
    assert list(rewritten.graph.output) == list(original.graph.output)

    # only default-domain ops; every conv output still produced, by exactly one node
    assert {n.domain for n in rewritten.graph.node} <= {"", "ai.onnx"}
    produced = [o for n in rewritten.graph.node for o in n.output]
    assert len(produced) == len(set(produced)), "an output name is produced twice"
    names = [n.name for n in rewritten.graph.node]
    assert len(names) == len(set(names)), "duplicate node names"
    for conv in convs:
        assert conv.output[0] in produced, f"output {conv.output[0]!r} of {conv.name} lost"
    if not lowered:
        return

    # FC form: every MatMul multiplies by a constant weight of the conv's dtype, as B except
    # with --weight-left; depthwise convs may have none (lowering/depthwise.py scales the taps
    # instead)
    inits = {t.name: t for t in rewritten.graph.initializer}
    conv_names = {c.name for c in convs}
    matmuls = [n for n in rewritten.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) >= sum(not _is_depthwise(c, original) for c in convs)
    weight_dtypes = {t.data_type for t in original.graph.initializer
                     if t.name in {c.input[1] for c in convs}}
    for mm in matmuls:
        assert mm.name.split("/convfc/")[0] in conv_names, mm.name
        weight_left = mm.name.endswith(f"/convfc/{WEIGHT_LEFT_NODE}")
        weight = inits.get(mm.input[0 if weight_left else 1])
        assert weight is not None, f"{mm.name}: {'A' if weight_left else 'B'} is not constant"
        assert weight.data_type in weight_dtypes
    old_nodes = {n.name for n in original.graph.node}
    for n in rewritten.graph.node:
        if n.name not in old_nodes:
            assert "/convfc/" in n.name, f"new node {n.name!r} is not named <conv>/convfc/.."
    for conv in convs:  # the original weights are gone once no node reads them
        assert conv.input[1] not in inits
    read = {name for graph in _graphs(rewritten.graph) for n in graph.node for name in n.input}
    added = set(inits) - {t.name for t in original.graph.initializer}
    assert added <= read, f"constants no node reads: {sorted(added - read)[:5]}"


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _graphs(sub)


@pytest.fixture(scope="session")
def reference_conv():
    """``reference_conv(x, w, b, strides, dilations, pads, group)``: numpy ONNX Conv."""
    return conv_reference


@pytest.fixture(scope="session")
def close():
    """``close(out, ref, rel, what)``: assert the max error relative to the output scale."""
    return assert_close


@pytest.fixture(scope="session")
def explicit_pads():
    """``explicit_pads(spatial, kernel, strides, dilations, pads, auto_pad)``."""
    return resolve_pads


@pytest.fixture(scope="session")
def faithful():
    """``faithful(original, rewritten, report, lowered=True)``: the invariants of a rewrite."""
    return check_rewritten
