"""``onnx_convfc.bench`` and the ``bench`` verb: interleaving, ratios, errors (not speed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from convmodels import conv_model, random_conv
from onnx import TensorProto, helper, numpy_helper

from onnx_convfc import rewrite_model
from onnx_convfc.bench import (
    DEFAULT_THREADS,
    bench_models,
    parse_threads,
    time_interleaved,
)
from onnx_convfc.cli import main
from onnx_convfc.io import InputError


class FakeSession:
    """Records the order of runs; each run takes ``cost`` fake milliseconds."""

    def __init__(self, label: str, log: list[str], clock: list[float], cost: float) -> None:
        self.label, self.log, self.clock, self.cost = label, log, clock, cost

    def run(self, names, feeds):
        self.log.append(self.label)
        self.clock[0] += self.cost
        return []


@pytest.fixture
def fake_clock(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("onnx_convfc.bench.time.perf_counter_ns",
                        lambda: int(clock[0] * 1e6))
    return clock


def test_rounds_rotate_the_order_and_ratio_is_to_the_first(fake_clock):
    log: list[str] = []
    sessions = {k: FakeSession(k, log, fake_clock, cost)
                for k, cost in (("a", 2.0), ("b", 3.0), ("c", 1.0))}
    timings = time_interleaved(sessions, {}, repeats=3, warmup=1)
    assert log[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    by_label = {t.label: t for t in timings}
    assert by_label["a"].ratio == 1.0
    assert by_label["b"].ratio == pytest.approx(1.5)
    assert by_label["c"].median_ms == pytest.approx(1.0)
    assert all(t.runs == 3 for t in timings)


@pytest.mark.parametrize("text, expected", [("default,1", (DEFAULT_THREADS, 1)),
                                            ("2", (2,)), ("1,1,4", (1, 4))])
def test_parse_threads(text, expected):
    assert parse_threads(text) == expected


@pytest.mark.parametrize("text", ["", "x", "-1", "1,,two"])
def test_parse_threads_rejects(text):
    with pytest.raises(ValueError):
        parse_threads(text)


@pytest.fixture
def model_pair(tmp_path):
    w, b = random_conv(np.random.default_rng(0), 4, 8, (3, 3))
    original = conv_model((1, 4, 10, 10), w, b, pads=[1, 1, 1, 1])
    rewritten, _ = rewrite_model(original)
    paths = tmp_path / "m.onnx", tmp_path / "m.convfc.onnx"
    onnx.save(original, paths[0])
    onnx.save(rewritten, paths[1])
    return paths


def test_bench_models_reports_every_thread_count(model_pair):
    report = bench_models(*model_pair, threads=(DEFAULT_THREADS, 1), repeats=3, warmup=0)
    assert [r.threads for r in report.rows] == ["default", "1"]
    assert all(r.provider == "cpu" and r.runs == 3 and r.ratio > 0 for r in report.rows)
    assert [s.shape for s in report.inputs] == [(1, 4, 10, 10)]


def test_bench_rejects_zero_repeats(model_pair):
    with pytest.raises(InputError, match="--repeats"):
        bench_models(*model_pair, repeats=0)


def test_cli_bench_writes_json(model_pair, tmp_path, capsys):
    out = tmp_path / "b.json"
    code = main(["bench", *map(str, model_pair), "--threads", "1", "--repeats", "2",
                 "--report-json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert [r["threads"] for r in data["rows"]] == ["1"]
    assert "ratio" in capsys.readouterr().out


def exit_code(argv: list[str]) -> int:
    """``main``'s return value, or the code of the SystemExit argparse raises."""
    try:
        return main(argv)
    except SystemExit as done:
        return done.code


@pytest.mark.parametrize("extra", [["--providers", "nosuch"], ["--threads", "x"],
                                   ["--input-shape", "nosuch:1x2"]])
def test_cli_bench_bad_input_exits_2(model_pair, extra, capsys):
    assert exit_code(["bench", *map(str, model_pair), "--repeats", "1", *extra]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_bench_missing_file_exits_2(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "no.onnx"), str(tmp_path / "no2.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


def vad_like() -> onnx.ModelProto:
    """silero-vad's trouble in small: ``input[:, :sr]`` reflect-padded by 40, then a conv; it
    runs only with a long enough ``input`` and a large ``sr`` (random ints are 0..3)."""
    consts = {"zero": [0], "axis1": [1], "pads": [0, 40, 0, 40]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in consts.items()]
    inits.append(numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((2, 1, 3)).astype(np.float32), "W"))
    nodes = [helper.make_node("Unsqueeze", ["sr", "zero"], ["end"]),
             helper.make_node("Slice", ["input", "zero", "end", "axis1"], ["cut"]),
             helper.make_node("Pad", ["cut", "pads"], ["padded"], mode="reflect"),
             helper.make_node("Unsqueeze", ["padded", "axis1"], ["x"]),
             helper.make_node("Conv", ["x", "W"], ["Y"], name="conv")]
    graph = helper.make_graph(nodes, "vad", [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "sequence"]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_cli_bench_at_inputs_the_model_cannot_take_names_them_and_the_pins(tmp_path, capsys):
    original = vad_like()
    rewritten, _ = rewrite_model(original)
    paths = [tmp_path / "vad.onnx", tmp_path / "vad.convfc.onnx"]
    onnx.save(original, paths[0])
    onnx.save(rewritten, paths[1])
    run = ["bench", *map(str, paths), "--threads", "1", "--repeats", "1", "--warmup", "0"]

    assert main(run) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Pad" in err, err
    assert "inputs tried: input float32 1x32 (random, defaults batch=1, sequence=32), " \
        "sr int64 scalar (random); pin them with --input-shape NAME:DxD.., " \
        "--input-value NAME:V[,V..] or --inputs FILE.npz" in err, err

    assert main([*run, "--input-shape", "input:1x64"]) == 2
    assert "input float32 1x64 (random), sr int64 scalar (random)" in capsys.readouterr().err

    assert main([*run, "--input-shape", "input:1x64", "--input-value", "sr:16000"]) == 0
    assert "sr int64 scalar (--input-value)" in capsys.readouterr().out
