"""Parity engine: ``check_parity``, its inputs, tolerances, providers, per-node and the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_convfc import ParityReport, check_parity, rewrite_model
from onnx_convfc.cli import main
from onnx_convfc.inputs import DEFAULT_DIM, parse_input_value, plan_feeds
from onnx_convfc.io import InputError
from onnx_convfc.parity import (
    ProviderError,
    Tolerance,
    Tolerances,
    compare_arrays,
    parse_tolerance,
    provider_options,
    resolve_providers,
)

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime does not list "
                                "CUDAExecutionProvider on this machine")
CONVS = ("conv1", "conv2", "conv3")


def chain_model(dims=(1, 3, 16, 16), seed: int = 0) -> onnx.ModelProto:
    """X -> conv1 3x3 pad 1 -> Relu -> conv2 1x1 -> Relu -> conv3 3x3 stride 2 -> Y."""
    rng = np.random.default_rng(seed)
    shapes = {"conv1": (8, 3, 3, 3), "conv2": (8, 8, 1, 1), "conv3": (4, 8, 3, 3)}
    attrs = {"conv1": dict(pads=[1, 1, 1, 1]), "conv2": {}, "conv3": dict(strides=[2, 2])}
    inits, nodes, x = [], [], "X"
    for i, name in enumerate(CONVS):
        w = (rng.standard_normal(shapes[name]) / np.sqrt(np.prod(shapes[name][1:])))
        inits += [numpy_helper.from_array(w.astype(np.float32), f"{name}.w"),
                  numpy_helper.from_array(rng.standard_normal(shapes[name][0])
                                          .astype(np.float32), f"{name}.b")]
        y = "Y" if i == len(CONVS) - 1 else f"{name}_out"
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name,
                                      **attrs[name]))
        if y != "Y":
            x = f"{name}_relu"
            nodes.append(helper.make_node("Relu", [y], [x], name=f"{name}_relu"))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def corrupted(rewritten: onnx.ModelProto, conv: str, delta: float = 0.05) -> onnx.ModelProto:
    """A copy with every element of ``<conv>/convfc/weight`` moved by ``delta``.

    All of it, not one element: a Relu after the conv could hide a single output channel."""
    copy = onnx.ModelProto()
    copy.CopyFrom(rewritten)
    init = next(t for t in copy.graph.initializer if t.name == f"{conv}/convfc/weight")
    w = numpy_helper.to_array(init).copy()
    w += delta
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    return copy


@pytest.fixture(scope="module")
def chain():
    model = chain_model()
    rewritten, report = rewrite_model(model)
    assert len(report.rewritten) == len(CONVS)
    return model, rewritten


@pytest.fixture
def saved(chain, tmp_path):
    """Paths of the original, the clean rewrite and a rewrite with conv2 corrupted."""
    model, rewritten = chain
    paths = {}
    for key, proto in (("original", model), ("rewritten", rewritten),
                       ("corrupted", corrupted(rewritten, "conv2"))):
        paths[key] = tmp_path / f"{key}.onnx"
        onnx.save(proto, paths[key])
    return paths


# ---------------------------------------------------------------- the engine

def test_clean_rewrite_passes(chain):
    model, rewritten = chain
    report = check_parity(model, rewritten, runs=2)
    assert isinstance(report, ParityReport) and report.passed
    (out,) = report.outputs
    assert out.tensor == "Y" and out.shape == (1, 4, 7, 7)
    assert out.stats.elements == 2 * 4 * 7 * 7
    assert out.stats.outside == 0 and out.stats.max_abs < 1e-4
    assert out.stats.cosine > 0.999999
    assert out.tolerance == Tolerance(1e-4, 1e-3, "fp32 default", "fp32 default")
    assert report.to_dict()["outputs"][0]["passed"] is True


@pytest.mark.parametrize("conv", CONVS)
def test_planted_corruption_fails_and_per_node_names_the_conv(chain, conv):
    model, rewritten = chain
    report = check_parity(model, corrupted(rewritten, conv), per_node=True)
    assert not report.passed
    assert report.outputs[0].stats.outside > 0
    assert [c.node for c in report.nodes] == list(CONVS)  # topological order
    first = report.first_divergence("cpu")
    assert first.node == conv and first.rewritten
    before = CONVS[:CONVS.index(conv)]
    assert all(c.passed for c in report.nodes if c.node in before)
    assert report.to_dict()["per_node"]["first_divergence"] == {"cpu": conv}


def test_per_node_marks_convs_left_as_conv(chain):
    model, _ = chain
    partial, _ = rewrite_model(model, skip=["conv3"])
    report = check_parity(model, partial, per_node=True)
    assert report.passed
    assert {c.node: c.rewritten for c in report.nodes} == {
        "conv1": True, "conv2": True, "conv3": False}
    assert report.nodes[-1].detail == "kept as Conv"


def test_per_node_compares_every_op_of_the_conv_family():
    """Conv -> ConvTranspose -> QuantizeLinear -> ConvInteger: each one's output is a row."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("W1", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        ("W2", rng.standard_normal((4, 2, 2, 2)).astype(np.float32)),
        ("scale", np.array(0.05, np.float32)), ("zp", np.array(128, np.uint8)),
        ("W3", rng.integers(0, 255, (2, 2, 3, 3)).astype(np.uint8)))]
    nodes = [helper.make_node("Conv", ["X", "W1"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["h", "W2"], ["up"], name="up", strides=[2, 2]),
             helper.make_node("QuantizeLinear", ["up", "scale", "zp"], ["q"], name="quant"),
             helper.make_node("ConvInteger", ["q", "W3", "zp"], ["Y"], name="int")]
    graph = helper.make_graph(
        nodes, "family", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rewritten, _ = rewrite_model(model)
    report = check_parity(model, rewritten, per_node=True)
    assert report.passed and not report.unexposed
    assert [(c.node, c.tensor, c.rewritten, c.passed) for c in report.nodes] == [
        ("conv", "h", True, True), ("up", "up", True, True), ("int", "Y", True, True)]
    partial, _ = rewrite_model(model, skip=["up"])
    report = check_parity(model, partial, per_node=True)
    assert [(c.node, c.rewritten, c.detail) for c in report.nodes] == [
        ("conv", True, None), ("up", False, "kept as ConvTranspose"), ("int", True, None)]


def test_convs_in_subgraphs_are_listed_as_not_exposed():
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")

    def branch(name: str) -> onnx.GraphProto:
        conv = helper.make_node("Conv", ["X", "W"], [f"{name}_y"], name=f"{name}_conv")
        return helper.make_graph([conv], name, [], [
            helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])

    node = helper.make_node("If", ["cond"], ["Y"], name="pick",
                            then_branch=branch("then"), else_branch=branch("else"))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                      helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rewritten, _ = rewrite_model(model)
    report = check_parity(model, rewritten, per_node=True, input_values=[("cond", ("1",))])
    assert report.passed and report.nodes == []
    assert sorted(n for n, _ in report.unexposed) == ["else_conv", "then_conv"]
    assert all("If 'pick'" in why for _, why in report.unexposed)
    assert report.inputs[0].source == "--input-value"


def test_different_inputs_are_bad_input(chain):
    model, _ = chain
    other = chain_model()
    other.graph.input[0].name = "Z"
    other.graph.node[0].input[0] = "Z"
    with pytest.raises(InputError, match="different inputs"):
        check_parity(model, other)


def test_rewritten_that_cannot_run_fails_instead_of_raising(chain):
    model, rewritten = chain
    broken = onnx.ModelProto()
    broken.CopyFrom(rewritten)
    broken.graph.node[0].op_type = "NoSuchOp"
    report = check_parity(model, broken)
    assert not report.passed and "NoSuchOp" in report.errors[0]


def test_declared_batch_of_zero_is_fed_empty_and_empty_outputs_are_equal(tmp_path, capsys):
    """onnxruntime enforces a declared 0 like any other size: feeding batch 1 failed both
    models. Two empty outputs of the same shape are equal, with nothing to compare."""
    src, out, report = tmp_path / "empty.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(chain_model(dims=(0, 3, 16, 16)), src)
    assert main(["rewrite", str(src), "-o", str(out), "--verify", "--quiet",
                 "--report-json", str(report)]) == 0, capsys.readouterr()
    parity = json.loads(report.read_text())["parity"]
    assert parity["passed"] and parity["inputs"][0]["shape"] == [0, 3, 16, 16]
    row = parity["outputs"][0]
    assert row["shape"] == [0, 4, 7, 7] and row["elements"] == 0 and row["cosine"] == 1.0
    assert any("output Y: empty" in n for n in parity["notes"]), parity["notes"]
    assert out.is_file()
    with pytest.raises(InputError, match="fixes it to 0"):
        plan_feeds(onnx.load(src), input_shapes=[("X", (1, 3, 16, 16))])


def test_onnxruntime_failing_on_an_empty_batch_says_the_inputs_are_empty():
    model = chain_model(dims=(0, 3, 16, 16))
    rewritten, _ = rewrite_model(model)
    hint = "the inputs hold no elements (X 0x3x16x16)"
    broken = onnx.ModelProto()
    broken.CopyFrom(rewritten)
    broken.graph.node[0].op_type = "NoSuchOp"
    report = check_parity(model, broken)
    assert not report.passed and hint in report.errors[0]

    # Row 0 of an empty batch: neither onnxruntime nor onnx.reference can run the original.
    for graph in (model.graph, rewritten.graph):
        graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "row"))
        graph.node.append(helper.make_node("Gather", ["Y", "row"], ["Z"], axis=0))
        graph.output[0].name = "Z"
    with pytest.raises(InputError, match=r"cannot run it either .*" + re.escape(hint)):
        check_parity(model, rewritten)


# ---------------------------------------------------------------- inputs

def test_npz_inputs_are_used(chain, tmp_path):
    model, rewritten = chain
    x = np.random.default_rng(7).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", X=x)
    plan = plan_feeds(model, inputs_npz=tmp_path / "in.npz")
    assert np.array_equal(plan.feeds(0)["X"], x) and np.array_equal(plan.feeds(1)["X"], x)
    report = check_parity(model, rewritten, inputs_npz=tmp_path / "in.npz")
    assert report.passed and report.inputs[0].source == "npz"

    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(InputError, match="no input 'images'"):
        check_parity(model, rewritten, inputs_npz=tmp_path / "bad.npz")
    np.savez(tmp_path / "rank.npz", X=x[0])
    with pytest.raises(InputError, match="rank 3"):
        plan_feeds(model, inputs_npz=tmp_path / "rank.npz")
    with pytest.raises(InputError, match="given both"):
        plan_feeds(model, inputs_npz=tmp_path / "in.npz", input_values=[("X", ("1",))])
    np.save(tmp_path / "single.npy", x)
    with pytest.raises(InputError, match="not a readable .npz"):
        plan_feeds(model, inputs_npz=tmp_path / "single.npy")


def test_dynamic_shapes_from_input_shape_and_defaults():
    model = chain_model(dims=("N", 3, "H", "W"))
    rewritten, _ = rewrite_model(model, input_shapes=[("X", (2, 3, 24, 20))])
    report = check_parity(model, rewritten, input_shapes=[("X", (2, 3, 24, 20))])
    assert report.passed and report.outputs[0].shape == (2, 4, 11, 9)
    assert report.notes == []

    defaults = check_parity(model, rewritten)
    assert defaults.passed and defaults.inputs[0].shape == (1, 3, DEFAULT_DIM, DEFAULT_DIM)
    assert f"H={DEFAULT_DIM}" in defaults.notes[0] and "N=1" in defaults.notes[0]

    with pytest.raises(InputError, match="rank 3"):
        plan_feeds(model, input_shapes=[("X", (3, 24, 20))])
    with pytest.raises(InputError, match="fixes it to 3"):
        plan_feeds(model, input_shapes=[("X", (1, 4, 24, 20))])


def test_shared_dim_names_resolve_together():
    graph = helper.make_graph(
        [helper.make_node("Add", ["A", "B"], ["C"])], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, None)])
    model = helper.make_model(graph)
    plan = plan_feeds(model, input_shapes=[("A", (2, 77))])
    assert [s.shape for s in plan.specs] == [(2, 77), (2, 77)]


def test_input_value_pins_scalars_and_random_data_follows_dtype():
    graph = helper.make_graph(
        [helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["X", "srf"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 5]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, []),
         helper.make_tensor_value_info("ids", TensorProto.INT32, [1000]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [1000]),
         helper.make_tensor_value_info("taps", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph)
    plan = plan_feeds(model, seed=3, input_values=[parse_input_value("sr:16000"),
                                                   parse_input_value("taps:1,2,3")])
    feeds = plan.feeds(0)
    assert feeds["sr"].shape == () and feeds["sr"] == 16000 and feeds["sr"].dtype == np.int64
    assert feeds["taps"].tolist() == [1, 2, 3]
    assert feeds["ids"].dtype == np.int32 and 0 <= feeds["ids"].min() <= feeds["ids"].max() < 4
    assert feeds["mask"].dtype == bool and 0 < feeds["mask"].sum() < 1000
    assert np.array_equal(plan_feeds(model, seed=3, input_values=[("sr", ("1",)),
                                                                  ("taps", ("1",))])
                          .feeds(0)["X"], feeds["X"])  # same seed, same draw
    assert not np.array_equal(plan.feeds(1)["X"], feeds["X"])  # runs draw anew

    report = check_parity(model, model, input_values=[("sr", ("16000",)), ("taps", ("1",))])
    assert report.passed and report.outputs[0].stats.scale > 1000
    with pytest.raises(InputError, match="not a valid int64"):
        plan_feeds(model, input_values=[("sr", ("1.5",))])
    with pytest.raises(InputError, match="2 values"):
        plan_feeds(model, input_values=[("sr", ("1", "2"))])
    with pytest.raises(InputError, match="no input 'rate'"):
        plan_feeds(model, input_values=[("rate", ("1",))])


# ---------------------------------------------------------------- tolerances and statistics

def test_tolerance_defaults_per_dtype_and_overrides():
    tol = Tolerances()
    fp32 = tol.for_tensor("y", np.float32)
    assert (fp32.atol, fp32.rtol) == (1e-4, 1e-3)
    fp16, fp64 = tol.for_tensor("y", np.float16), tol.for_tensor("y", np.float64)
    assert fp16.atol > 1e-4 and fp16.rtol > 1e-3
    assert fp64.atol < 1e-4 and fp64.rtol < 1e-3
    exact = tol.for_tensor("ids", np.int64)
    assert (exact.atol, exact.rtol) == (0.0, 0.0)

    custom = Tolerances(atol=["1e-3", "logits:0.5"], rtol=0.01)
    assert custom.for_tensor("logits", np.float32) == Tolerance(0.5, 0.01, "--atol logits:",
                                                                 "--rtol")
    assert custom.for_tensor("y", np.float16).atol == 1e-3
    assert parse_tolerance("model/out:0:1e-2") == ("model/out:0", 1e-2)
    for bad in ("abc", "x:-1", ":1", "x:nan"):
        with pytest.raises(ValueError):
            parse_tolerance(bad)


def test_per_output_tolerance_names_must_exist(chain):
    model, rewritten = chain
    with pytest.raises(InputError, match="name no output: Z"):
        check_parity(model, rewritten, atol=["Z:1"])


def test_compare_arrays_counts_and_nonfinite_values():
    tol = Tolerance(1e-4, 1e-3, "", "")
    ref = np.array([1.0, 2.0, np.nan, np.inf, 0.0], dtype=np.float32)
    same = compare_arrays(ref, ref.copy(), tol)
    assert same.outside == 0 and same.nan_original == 1 and same.inf_rewritten == 1
    assert same.cosine == pytest.approx(1.0)

    off = ref.copy()
    off[1] += 0.01  # outside 1e-4 + 1e-3 * 2
    off[2] = 0.0  # NaN in the original only
    stats = compare_arrays(ref, off, tol)
    assert stats.outside == 2 and stats.nan_rewritten == 0
    assert stats.max_abs == pytest.approx(0.01, rel=1e-5)
    assert stats.max_rel == pytest.approx(0.01 / 2, rel=1e-5)
    assert stats.scale == 2.0
    assert stats.mean_abs == pytest.approx(0.01 / 3, rel=1e-5)  # over the 3 finite pairs


# ---------------------------------------------------------------- providers

def test_missing_or_unknown_provider_is_an_error(chain):
    model, rewritten = chain
    if not HAS_CUDA:
        with pytest.raises(ProviderError, match="'cuda' .*not available"):
            check_parity(model, rewritten, providers="cpu,cuda")
    with pytest.raises(ProviderError, match="unknown execution provider 'tpu9'"):
        resolve_providers(["tpu9"])
    assert resolve_providers("cpu, CPUExecutionProvider") == ["CPUExecutionProvider"]


def test_cuda_runs_without_tf32():
    assert provider_options("CUDAExecutionProvider") == {"use_tf32": "0"}
    assert provider_options("CPUExecutionProvider") == {}


def test_sessions_get_the_provider_options_and_refuse_a_silent_fallback(chain, monkeypatch):
    """The construction logic of a CUDA session, checked without a GPU by recording it."""
    model, rewritten = chain
    created = []

    class Recorder:
        def __init__(self, source, options, providers):
            created.append(providers)

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Recorder)
    with pytest.raises(ProviderError, match="could not start CUDAExecutionProvider"):
        check_parity(model, rewritten, providers="cuda")
    assert created == [[("CUDAExecutionProvider", {"use_tf32": "0"})]]


@needs_cuda
def test_clean_rewrite_passes_on_cuda(chain):
    model, rewritten = chain
    report = check_parity(model, rewritten, providers="cpu,cuda", per_node=True)
    assert report.providers == ["cpu", "cuda"]
    assert report.passed, report.summary()
    assert {c.provider for c in report.outputs} == {"cpu", "cuda"}


@needs_cuda
def test_planted_corruption_is_found_on_cuda(chain):
    model, rewritten = chain
    report = check_parity(model, corrupted(rewritten, "conv2"), providers="cuda",
                          per_node=True)
    assert not report.passed and report.first_divergence("cuda").node == "conv2"


# ---------------------------------------------------------------- command line

def test_cli_check_exit_codes_and_json(saved, tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert main(["check", str(saved["original"]), str(saved["rewritten"]),
                 "--report-json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["outputs"][0]["tensor"] == "Y"
    assert data["outputs"][0]["atol"] == 1e-4 and "fp32 default" in data["outputs"][0]["tolerance"]
    assert data["inputs"] == [{"name": "X", "dtype": "float32", "shape": [1, 3, 16, 16],
                               "source": "random"}]
    assert "max_abs" in capsys.readouterr().out

    assert main(["check", str(saved["original"]), str(saved["corrupted"]), "--per-node",
                 "--runs", "2", "--report-json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert data["passed"] is False and data["runs"] == 2
    assert data["per_node"]["first_divergence"] == {"cpu": "conv2"}
    printed = capsys.readouterr().out
    assert "first diverging conv 'conv2'" in printed and "parity FAILED" in printed

    assert main(["check", str(saved["original"]), str(saved["corrupted"]),
                 "--atol", "Y:10", "--rtol", "Y:1"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--providers", "cuda"], "not available"),
    (["--providers", "nope"], "unknown execution provider"),
    (["--atol", "x:abc"], "expected [NAME:]V"),
    (["--input-shape", "X:1x3"], "rank 2"),
    (["--input-value", "X"], "expected NAME:V"),
    (["--inputs", "missing.npz"], "no such file"),
    (["--runs", "0"], "at least 1"),
])
def test_cli_bad_input_exits_2_with_one_line(saved, capsys, extra, message):
    if HAS_CUDA and "cuda" in extra:
        pytest.skip("CUDA is available here")
    argv = ["check", str(saved["original"]), str(saved["rewritten"]), *extra]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse type errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_rewrite_verify(tmp_path, capsys):
    src = tmp_path / "dyn.onnx"
    onnx.save(chain_model(dims=("N", 3, "H", "W")), src)
    report = tmp_path / "report.json"
    assert main(["rewrite", str(src), "--verify", "--per-node", "--input-shape",
                 "X:1x3x20x20", "--report-json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["rewritten"] == 3 and data["parity"]["passed"] is True
    assert data["parity"]["inputs"][0]["shape"] == [1, 3, 20, 20]
    assert [c["node"] for c in data["parity"]["per_node"]["convs"]] == list(CONVS)
    assert (tmp_path / "dyn.convfc.onnx").is_file()
    assert "parity holds" in capsys.readouterr().out

    assert main(["rewrite", str(src), "-o", str(tmp_path / "o.onnx"), "--verify",
                 "--atol", "0", "--rtol", "0", "--runs", "3", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "parity FAILED" in captured.out
    assert captured.err == "parity failed: nothing written; rerun without --verify to keep " \
        "the output anyway\n"
    assert not (tmp_path / "o.onnx").exists()


def test_cli_help_shows_examples(capsys):
    for verb in ("check", "rewrite"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = capsys.readouterr().out
        assert "example:" in text and "--providers" in text and "--input-value" in text
