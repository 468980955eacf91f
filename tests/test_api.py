"""The Python API pipelines use: ``rewrite_model``, ``RewriteOptions`` (the single source of
the CLI's rewrite flags), the onnx-graphsurgeon step, and FC form without Gemm."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from convmodels import conv_model, random_conv, run
from onnx import ModelProto, TensorProto, helper, numpy_helper

import onnx_convfc
from onnx_convfc import RewriteOptions
from onnx_convfc.cli import build_parser, options_from_args
from onnx_convfc.graphsurgeon import lower_convs, register_graph_method
from onnx_convfc.options import METHODS
from onnx_convfc.plan import GEMM_FREE

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo_cnn.onnx"


def grouped_pointwise() -> ModelProto:
    w, b = random_conv(np.random.default_rng(0), 8, 8, (1, 1), group=4)
    return conv_model((2, 8, 5, 5), w, b, group=4)


def all_nodes(model: ModelProto):
    """Nodes of the main graph, of every subgraph, and of every local function."""
    def walk(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                for sub in attr.graphs:
                    yield from walk(sub)
    yield from walk(model.graph)
    for function in model.functions:
        yield from function.node


def matmul_weight_shapes(model: ModelProto) -> list[tuple[int, ...]]:
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul"]


# ---------------------------------------------------------------- rewrite_model

def test_rewrite_model_takes_a_model_or_a_path_and_leaves_the_input_alone(tmp_path):
    model = grouped_pointwise()
    before = model.SerializeToString()
    from_proto, report = onnx_convfc.rewrite_model(model)
    assert model.SerializeToString() == before
    assert isinstance(from_proto, ModelProto) and len(report.rewritten) == 1

    onnx.save(model, tmp_path / "m.onnx")
    from_path, _ = onnx_convfc.rewrite_model(tmp_path / "m.onnx")
    assert from_path.SerializeToString() == from_proto.SerializeToString()


def test_keyword_overrides_replace_single_fields_of_the_options():
    options = RewriteOptions(method="im2col")
    rewritten, report = onnx_convfc.rewrite_model(grouped_pointwise(), options, split_groups=True)
    assert [r.lowering for r in report.rows] == ["im2col"]
    assert matmul_weight_shapes(rewritten) == [(2, 2)] * 4
    assert options.split_groups is False  # the caller's options are not changed


def test_an_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="split_group"):
        onnx_convfc.rewrite_model(grouped_pointwise(), split_group=True)


def test_every_rewrite_option_is_a_documented_cli_flag(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["rewrite", "--help"])
    rewrite_help = capsys.readouterr().out
    for f in fields(RewriteOptions):
        assert f.metadata.get("help"), f"{f.name} has no help text"
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        assert flag in rewrite_help, f"{flag} missing from 'rewrite --help'"
    args = parser.parse_args(["rewrite", "m.onnx", "--split-groups", "--method", "im2col"])
    assert options_from_args(args) == RewriteOptions(method="im2col", split_groups=True)


# ---------------------------------------------------------------- FC form: never Gemm

def fc_head() -> ModelProto:
    """A conv whose kernel covers its whole input: the ``fc`` lowering's case."""
    w, b = random_conv(np.random.default_rng(1), 4, 6, (5, 5))
    return conv_model((2, 4, 5, 5), w, b)


def strided_3x3() -> ModelProto:
    w, b = random_conv(np.random.default_rng(2), 3, 4, (3, 3))
    return conv_model((1, 3, 9, 9), w, b, strides=[2, 2], pads=[1, 1, 1, 1])


@pytest.mark.parametrize("split_groups", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_output_never_contains_a_gemm(method, split_groups):
    models = [fc_head(), strided_3x3(), grouped_pointwise()]
    if DEMO.exists():
        models.append(onnx.load(DEMO))
    lowered = 0
    for model in models:
        rewritten, report = onnx_convfc.rewrite_model(model, method=method,
                                                      split_groups=split_groups)
        lowered += len(report.rewritten)
        ops = {n.op_type for n in all_nodes(rewritten)}
        assert "Gemm" not in ops, f"{method}: Gemm in the output"
        assert "MatMul" in ops or not report.rewritten or method in GEMM_FREE
    assert lowered, f"{method} lowered nothing: the test would prove nothing"


# ---------------------------------------------------------------- onnx-graphsurgeon

def test_lower_convs_rewrites_the_graph_the_caller_holds(close):
    model = grouped_pointwise()
    graph = gs.import_onnx(model)
    report = lower_convs(graph, split_groups=True)
    assert len(report.rewritten) == 1
    assert not [n for n in graph.nodes if n.op == "Conv"]
    assert "Y" in graph.tensors()  # the conv's output keeps its name

    graph.cleanup().toposort()  # the pipeline goes on with the same object
    rewritten = gs.export_onnx(graph)
    assert matmul_weight_shapes(rewritten) == [(2, 2)] * 4
    x = np.random.default_rng(3).standard_normal((2, 8, 5, 5)).astype(np.float32)
    close(run(rewritten, {"X": x})[0], run(model, {"X": x})[0], 1e-5, "gs graph")


def test_register_graph_method_is_opt_in(monkeypatch):
    code = ("import onnx_graphsurgeon as gs, onnx_convfc.graphsurgeon; "
            "assert 'lower_convs' not in gs.Graph.GLOBAL_FUNC_MAP")
    subprocess.run([sys.executable, "-c", code], check=True)

    monkeypatch.setattr(gs.Graph, "GLOBAL_FUNC_MAP", dict(gs.Graph.GLOBAL_FUNC_MAP))
    register_graph_method()
    graph = gs.import_onnx(grouped_pointwise())
    report = graph.lower_convs(RewriteOptions(method="im2col"))
    assert [r.lowering for r in report.rows] == ["im2col"]
    assert not [n for n in graph.nodes if n.op == "Conv"]


def conv_in_a_function_and_an_if_branch() -> ModelProto:
    """``A = local.ConvRelu(X)`` (Constant weight inside), then ``If`` whose then-branch
    convolves ``A`` with an outer initializer."""
    rng = np.random.default_rng(4)
    w1, w2 = (rng.standard_normal((4, 4, 3, 3)).astype(np.float32) for _ in range(2))
    value = helper.make_tensor_value_info
    function = helper.make_function(
        "local", "ConvRelu", ["x"], ["y"],
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w1)),
         helper.make_node("Conv", ["x", "w"], ["c"], name="fn_conv", pads=[1] * 4),
         helper.make_node("Relu", ["c"], ["y"])],
        [helper.make_opsetid("", 17)])
    then_branch = helper.make_graph(
        [helper.make_node("Conv", ["A", "W2"], ["t"], name="then_conv", pads=[1] * 4)],
        "then", [], [value("t", TensorProto.FLOAT, [1, 4, 6, 6])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["A"], ["e"])], "else", [],
                                    [value("e", TensorProto.FLOAT, [1, 4, 6, 6])])
    graph = helper.make_graph(
        [helper.make_node("ConvRelu", ["X"], ["A"], domain="local", name="call"),
         helper.make_node("If", ["cond"], ["Y"], name="if", then_branch=then_branch,
                          else_branch=else_branch)],
        "g", [value("X", TensorProto.FLOAT, [1, 4, 6, 6]), value("cond", TensorProto.BOOL, [])],
        [value("Y", TensorProto.FLOAT, [1, 4, 6, 6])], [numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, functions=[function], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model.ir_version = 8
    return model


def test_lower_convs_reaches_functions_and_subgraphs(close):
    model = conv_in_a_function_and_an_if_branch()
    graph = gs.import_onnx(model)
    report = lower_convs(graph)
    assert sorted(r.node for r in report.rewritten) == ["fn_conv", "then_conv"]
    assert all(sub.functions is graph.functions for sub in graph.subgraphs(recursive=True))

    rewritten = gs.export_onnx(graph)
    assert "Conv" not in {n.op_type for n in all_nodes(rewritten)}
    x = np.random.default_rng(5).standard_normal((1, 4, 6, 6)).astype(np.float32)
    for cond in (True, False):
        feeds = {"X": x, "cond": np.array(cond)}
        close(run(rewritten, feeds)[0], run(model, feeds)[0], 1e-5, f"cond={cond}")
