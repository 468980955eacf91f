"""``onnx_convfc.profile``: where the time goes, per lowering and conv kind (not how fast)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_convfc import rewrite_model
from onnx_convfc.cli import main
from onnx_convfc.io import InputError
from onnx_convfc.profile import (
    ORIGINAL_OPS,
    UNATTRIBUTED,
    _Index,
    _Known,
    _Origins,
    _own_times,
    break_down,
    conv_kind,
    lowerings_from_json,
    profile_lines,
    profile_nodes,
)

DEMO = Path(__file__).parent.parent / "models" / "demo_cnn.onnx"
RUNS = 2


@pytest.fixture(scope="module")
def demo():
    """demo_cnn (pointwise, fc, im2col and depthwise convs), rewritten, both profiled."""
    original = onnx.load(str(DEMO))
    rewritten, report = rewrite_model(original)
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 32, 32), np.float32)}
    before = profile_nodes(original, feeds, runs=RUNS)
    after = profile_nodes(rewritten, feeds, runs=RUNS)
    return original, rewritten, report, before, after


def test_buckets_add_up_to_the_profiled_totals(demo):
    original, rewritten, report, before, after = demo
    profile = break_down(original, rewritten, before, after, lowerings=report)
    assert profile.totals == pytest.approx((before.total, after.total), rel=1e-9)
    assert sum(c.ms for c in profile.convs) <= after.total
    for bucket in profile.rewritten:
        assert bucket.ms == pytest.approx(sum(bucket.ops.values()))


def test_every_lowering_of_the_report_has_its_bucket(demo):
    original, rewritten, report, before, after = demo
    profile = break_down(original, rewritten, before, after, lowerings=report)
    wanted = Counter(r.lowering for r in report.rewritten)
    assert len(wanted) >= 3  # the demo exercises several lowerings
    got = {b.label: b.convs for b in profile.rewritten if b.label in wanted}
    assert got == dict(wanted)
    assert {c.conv for c in profile.convs} == {r.node for r in report.rewritten}
    assert all(c.lowering == dict((r.node, r.lowering) for r in report.rows)[c.conv]
               for c in profile.convs)


def test_original_convs_are_grouped_by_kind(demo):
    original, rewritten, report, before, after = demo
    profile = break_down(original, rewritten, before, after, lowerings=report)
    kinds = {b.kind: b.convs for b in profile.original if b.kind}
    # demo_cnn: stem 3x3, three 1x1 and the 1x1 classifier, a grouped 3x3, two depthwise
    assert kinds == {"Conv group-1 kxk": 1, "Conv group-1 1x1": 4, "Conv grouped": 1,
                     "Conv depthwise": 2}
    assert set(profile.kinds()) == set(kinds)
    assert all(o > 0 and r > 0 for o, r in profile.kinds().values())


def test_without_lowerings_each_conv_is_its_own_row(demo):
    original, rewritten, report, before, after = demo
    profile = break_down(original, rewritten, before, after)
    labels = [b.label for b in profile.rewritten]
    assert "block2/depthwise (Conv depthwise, lowering unknown)" in labels
    assert sum(label.endswith("lowering unknown)") for label in labels) == len(report.rewritten)
    text = "\n".join(profile_lines(profile.to_dict()))
    assert "rewritten, per lowering" in text and "convs by kind" in text


def relu_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="act")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_model_without_convs_is_all_original_ops():
    model = relu_model()
    feeds = {"x": np.ones((1, 4, 8, 8), np.float32)}
    profiled = profile_nodes(model, feeds, runs=RUNS)
    profile = break_down(model, model, profiled, profiled)
    assert [b.label for b in profile.rewritten] == [ORIGINAL_OPS]
    assert [b.label for b in profile.original] == [ORIGINAL_OPS]
    assert profile.convs == [] and profile.kinds() == {}


def test_a_skipped_conv_is_not_lowered_time(demo):
    original, _, _, before, _ = demo
    kept, report = rewrite_model(original, skip=("*",))
    assert not report.rewritten
    feeds = {"input": np.zeros((1, 3, 32, 32), np.float32)}
    profile = break_down(original, kept, before, profile_nodes(kept, feeds, runs=RUNS),
                         lowerings=report)
    assert profile.convs == []
    labels = {b.label for b in profile.rewritten}
    assert labels - {ORIGINAL_OPS, UNATTRIBUTED} == {f"{b.kind} (not lowered)"
                                                     for b in profile.original if b.kind}


def node(op, inputs, outputs, name, **attrs):
    return helper.make_node(op, inputs, outputs, name=name, **attrs)


def graph_model(nodes) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, None)],
                              [helper.make_tensor_value_info(nodes[-1].output[0], 1, None)])
    return helper.make_model(graph)


def test_a_made_node_goes_to_the_one_conv_around_it():
    optimized = graph_model([
        node("Concat", ["x"], ["p"], "c/convfc/patches", axis=0),
        node("Reshape", ["p"], ["r"], "gemm_input_reshape"),
        node("Gemm", ["r"], ["g"], "c/convfc/MatMul/MatMulAddFusion"),
        node("Reshape", ["g"], ["o"], "gemm_output_reshape"),
        node("Relu", ["o"], ["y"], "act")])
    owner = {"c/convfc/patches": "c", "c/convfc/MatMul/MatMulAddFusion": "c", "act": None}
    index = _Index(optimized)
    assert index.sole_owner("gemm_input_reshape", owner) == "c"
    assert index.sole_owner("gemm_output_reshape", owner) is None  # also feeds an original op


def test_names_onnxruntime_gave_lead_back_to_model_nodes():
    model = graph_model([node("Conv", ["x", "w"], ["t"], "conv1"),
                         node("Relu", ["t"], ["r"], "act"),
                         node("Mul", ["r", "r"], ["y"], "scale/mul")])
    known = _Known(model)
    assert known.node("conv1") == "conv1"
    assert known.node("r_nchwc") == "act"  # the layout pass names a node after its output
    assert known.node("scale/mul/QuickGeluFusion/") == "scale/mul"
    assert known.node("ReorderInput_token_3") is None
    origins = _Origins(model, ())
    assert origins.lowered_from("conv1/convfc/MatMul") == "conv1"
    assert origins.lowered_from("_inlfunc_f_conv1/convfc/Pad") == "conv1"
    assert origins.lowered_from("act/convfc/x") is None  # a Relu is never lowered


@pytest.mark.parametrize("group, shape, attrs, kind", [
    (1, (8, 4, 3, 3), {}, "Conv group-1 kxk"),
    (1, (8, 4, 1, 1), {}, "Conv group-1 1x1"),
    (4, (8, 1, 3, 3), {}, "Conv depthwise"),
    (2, (8, 2, 3, 3), {}, "Conv grouped"),
    (1, None, {"kernel_shape": [1, 1]}, "Conv group-1 1x1"),
    (1, None, {}, "Conv group-1"),
])
def test_conv_kind(group, shape, attrs, kind):
    conv = helper.make_node("Conv", ["x", "w"], ["y"], group=group, **attrs)
    assert conv_kind(conv, shape) == kind
    fused = helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft",
                             group=group, **attrs)
    assert conv_kind(fused, shape) == kind


def kernel(op, ts, dur):
    return {"ts": ts, "dur": dur, "args": {"op_name": op}}


def test_a_control_flow_node_keeps_only_its_own_time():
    # Loop [0, 100) runs If [10, 60) (Conv [12, 42), Relu [45, 55)), then Add [70, 90)
    events = [kernel("Loop", 0, 100), kernel("If", 10, 50), kernel("Conv", 12, 30),
              kernel("Relu", 45, 10), kernel("Add", 70, 20), kernel("Mul", 100, 5)]
    own = _own_times(events)
    assert own == [30, 10, 30, 10, 20, 5]  # the Loop: 0-10, 60-70 and 90-100 of its own
    assert sum(own[:5]) == 100  # the Loop's span, counted once


def test_lowerings_from_json(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"convs": [{"node": "a", "lowering": "im2col"},
                                          {"node": "b", "lowering": None}]}))
    assert lowerings_from_json(path) == {"a": "im2col", "b": None}
    path.write_text("[1, 2]")
    with pytest.raises(InputError, match="not a rewrite report"):
        lowerings_from_json(path)
    with pytest.raises(InputError, match="cannot read"):
        lowerings_from_json(tmp_path / "missing.json")


@pytest.fixture
def demo_pair(tmp_path):
    out, report_json = tmp_path / "d.onnx", tmp_path / "r.json"
    assert main(["rewrite", str(DEMO), "-o", str(out), "--report-json", str(report_json)]) == 0
    return [str(DEMO), str(out)], report_json


def test_cli_bench_profile_names_the_lowerings(demo_pair, tmp_path, capsys):
    models, report_json = demo_pair
    capsys.readouterr()
    out = tmp_path / "b.json"
    code = main(["bench", *models, "--threads", "1", "--repeats", "2",
                 "--rewrite-report", str(report_json), "--report-json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "rewritten, per lowering" in printed and "depthwise (2 convs)" in printed
    profile = json.loads(out.read_text())["profile"]
    assert sum(b["ms"] for b in profile["rewritten"]) == pytest.approx(profile["rewritten_ms"])


def test_cli_bench_profile_without_report_lists_convs(demo_pair, capsys):
    models, _ = demo_pair
    capsys.readouterr()
    assert main(["bench", *models, "--threads", "1", "--repeats", "2", "--profile"]) == 0
    printed = capsys.readouterr().out
    assert "block2/depthwise (Conv depthwise, lowering unknown)" in printed
    assert "--rewrite-report" in printed


def test_cli_bench_bad_rewrite_report_exits_2(demo_pair, capsys):
    models, _ = demo_pair
    code = main(["bench", *models, "--repeats", "1", "--rewrite-report", models[0]])
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1
