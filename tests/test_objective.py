"""``--objective latency``: the fastest timed candidate wins, timings are cached per geometry,
dynamic shapes keep the rules, and a real timed rewrite keeps parity.

Every test but the last injects a fake timer, so choices are deterministic and nothing runs
onnxruntime's timing loop.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from convmodels import conv_model, random_conv, run
from onnx import helper, numpy_helper

from onnx_convfc import InputError, rewrite_model
from onnx_convfc.cli import main
from onnx_convfc.conv import conv_spec
from onnx_convfc.objective import MARGIN, LatencyObjective
from onnx_convfc.options import RewriteOptions
from onnx_convfc.plan import choose

LATENCY = RewriteOptions(objective="latency", latency_threads=1)


class FakeTimer:
    """Returns fixed milliseconds per label for the labels it is given; counts its calls."""

    def __init__(self, ms: dict[str, float]) -> None:
        self.ms = ms
        self.calls: list[tuple[str, ...]] = []
        self.threads: list[int] = []

    def __call__(self, models, feeds, threads, seconds):
        self.calls.append(tuple(models))
        self.threads.append(threads)
        return {label: self.ms[label] for label in models if label in self.ms}


def _spec(c=32, m=32, group=32, size=(7, 7), kernel=(3, 3), name="dw"):
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name=name, group=group,
                            pads=[1, 1, 1, 1])
    shape = (1, c, *size) if size is not None else None
    return conv_spec(node, (m, c // group, *kernel), shape)


def _pick(objective, spec, options=LATENCY):
    weight = np.zeros((spec.out_channels, spec.in_per_group, *spec.kernel), np.float32)
    picker = objective.picker("Conv", weight, (1, spec.in_channels, *spec.input_spatial), 17)
    return choose(spec, options, 4, pick=picker)


def test_the_fastest_candidate_replaces_the_rules_choice():
    timer = FakeTimer({"Conv": 1.0, "depthwise": 3.0, "im2col": 2.0, "dense": 9.0})
    objective = LatencyObjective(LATENCY, timer)
    decision = _pick(objective, _spec())
    assert decision.lowering == "im2col"
    assert decision.note == "latency: im2col 2.00x vs rules' depthwise 3.00x of Conv"
    assert timer.calls == [("Conv", "depthwise", "im2col", "dense")]
    notes = objective.finish()
    assert "1 of 1 timed convs changed" in notes[0]
    assert "2.000 ms as chosen vs 3.000 ms under the rules (1.50x)" in notes[0]


def test_a_gain_within_the_margin_keeps_the_rules_choice():
    close = 3.0 * (1 - MARGIN / 2)
    objective = LatencyObjective(LATENCY, FakeTimer({"Conv": 1.0, "depthwise": 3.0,
                                                     "im2col": close, "dense": 9.0}))
    decision = _pick(objective, _spec())
    assert decision.lowering == "depthwise"
    assert decision.note.startswith("latency: kept depthwise 3.00x of Conv (others im2col")


def test_skipped_and_over_budget_lowerings_are_not_candidates():
    timer = FakeTimer({"Conv": 1.0, "depthwise": 3.0, "im2col": 2.0})
    options = LATENCY.updated(skip=("dense",), max_dense_bytes=0)
    _pick(LatencyObjective(options, timer), _spec(), options)
    assert timer.calls == [("Conv", "depthwise", "im2col")]


def test_times_in_ms_when_the_original_op_cannot_run():
    objective = LatencyObjective(LATENCY, FakeTimer({"depthwise": 0.5, "im2col": 0.25}))
    decision = _pick(objective, _spec(), LATENCY.updated(max_dense_bytes=0))
    assert decision.note == "latency: im2col 0.250 ms vs rules' depthwise 0.500 ms"


def test_each_geometry_is_timed_once_per_rewrite_and_across_rewrites(tmp_path):
    cache = tmp_path / "latency.json"
    options = LATENCY.updated(latency_cache=str(cache))
    timer = FakeTimer({"Conv": 1.0, "depthwise": 3.0, "im2col": 2.0, "dense": 9.0})
    objective = LatencyObjective(options, timer)
    first = _pick(objective, _spec(name="a"))
    second = _pick(objective, _spec(name="b"))  # same geometry, another node
    _pick(objective, _spec(size=(5, 5), name="c"))  # another geometry
    assert len(timer.calls) == 2
    assert first.lowering == second.lowering == "im2col"
    objective.finish()
    assert len(json.loads(cache.read_text())["entries"]) == 2

    def no_timing(*args):
        raise AssertionError("a cached geometry was timed again")

    again = LatencyObjective(options, no_timing)
    assert _pick(again, _spec(name="d")).lowering == "im2col"
    assert "timed 0 distinct conv geometries (1 more from the cache)" in again.finish()[0]


def test_the_thread_count_is_used_and_keys_the_cache(tmp_path):
    cache = str(tmp_path / "latency.json")
    ms = {"Conv": 1.0, "depthwise": 3.0, "im2col": 2.0, "dense": 9.0}
    timer = FakeTimer(ms)
    for threads in (1, 2, 2):
        objective = LatencyObjective(LATENCY.updated(latency_cache=cache,
                                                     latency_threads=threads), timer)
        _pick(objective, _spec())
        objective.finish()
    assert timer.threads == [1, 2]


def test_a_file_that_is_not_a_cache_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="not a latency cache"):
        LatencyObjective(LATENCY.updated(latency_cache=str(bad)))


def test_dynamic_spatial_sizes_keep_the_rules_with_a_reason():
    def no_timing(*args):
        raise AssertionError("a dynamic geometry was timed")

    objective = LatencyObjective(LATENCY, no_timing)
    spec = _spec(size=None)
    weight = np.zeros((32, 1, 3, 3), np.float32)
    decision = choose(spec, LATENCY, 4, pick=objective.picker("Conv", weight, None, 17))
    assert decision.lowering == "depthwise"
    assert decision.note == ("latency: spatial size is not static, nothing fixed to time; "
                             "kept the rules' depthwise")
    assert any("1 convs kept the rules' choice: spatial size is not static" in n
               for n in objective.finish())


def test_a_spent_budget_keeps_the_rules():
    timer = FakeTimer({"Conv": 1.0, "depthwise": 3.0, "im2col": 2.0, "dense": 9.0})
    decision = _pick(LatencyObjective(LATENCY.updated(latency_budget_s=0), timer), _spec())
    assert decision.lowering == "depthwise" and "--latency-budget-s spent" in decision.note
    assert timer.calls == []


def test_one_distinct_candidate_is_not_timed():
    def no_timing(*args):
        raise AssertionError("a conv with one candidate form was timed")

    # a 1x1 conv: pointwise and im2col emit the same graph; no dense under a zero budget
    options = LATENCY.updated(max_dense_bytes=0)
    spec = _spec(c=16, m=8, group=1, kernel=(1, 1))
    decision = _pick(LatencyObjective(options, no_timing), spec, options)
    assert decision.lowering == "pointwise" and decision.note is None


def test_rules_objective_and_other_ops_take_no_picker():
    objective = LatencyObjective(LATENCY)
    weight = np.zeros((8, 8, 3, 3), np.float32)
    assert objective.picker("ConvTranspose", weight, None, 17) is None
    assert objective.picker("Conv", None, None, 17) is None  # run-time weight
    assert RewriteOptions().objective == "rules"
    with pytest.raises(ValueError, match="objective must be one of rules, latency"):
        RewriteOptions(objective="speed")


def _two_conv_model() -> onnx.ModelProto:
    """A depthwise 3x3 (depthwise vs im2col vs dense) and a conv covering its whole input
    (fc vs im2col vs dense), with a Relu between."""
    rng = np.random.default_rng(7)
    dw, dw_b = random_conv(rng, 32, 32, (3, 3), group=32)
    head, _ = random_conv(rng, 32, 8, (10, 10), bias=False)
    nodes = [helper.make_node("Conv", ["x", "dw", "dw_b"], ["h"], name="dw", group=32,
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "head"], ["y"], name="head")]
    inits = [numpy_helper.from_array(a, n) for a, n in ((dw, "dw"), (dw_b, "dw_b"),
                                                        (head, "head"))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32, 10, 10])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_timed_rewrite_keeps_parity_and_reports_its_choices():
    model = _two_conv_model()
    rewritten, report = rewrite_model(model, LATENCY)
    assert [r.lowering for r in report.rows] in (
        [a, b] for a in ("depthwise", "im2col", "dense") for b in ("fc", "im2col", "dense"))
    assert all(r.note.startswith("latency: ") for r in report.rows)
    assert report.notes[-1].startswith("latency objective (onnxruntime")
    assert "timed 2 distinct conv geometries" in report.notes[-1]
    x = np.random.default_rng(0).standard_normal((1, 32, 10, 10)).astype(np.float32)
    (want,), (got,) = run(model, {"x": x}), run(rewritten, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_cli_takes_the_objective_flags(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    w, b = random_conv(np.random.default_rng(0), 4, 4, (3, 3), group=4)
    onnx.save(conv_model((1, 4, 6, 6), w, b, group=4, pads=[1, 1, 1, 1]), path)
    cache = tmp_path / "c.json"
    assert main(["inspect", str(path), "--objective", "latency", "--latency-threads", "1",
                 "--latency-cache", str(cache), "--max-dense-bytes", "0"]) == 0
    assert "latency: " in capsys.readouterr().out and cache.exists()
    cache.write_text("not json")
    assert main(["inspect", str(path), "--objective", "latency",
                 "--latency-cache", str(cache)]) == 2
    assert "not a latency cache" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["inspect", str(path), "--latency-budget-s", "-1"])
    assert usage.value.code == 2
    assert "expected a finite number of seconds >= 0" in capsys.readouterr().err
