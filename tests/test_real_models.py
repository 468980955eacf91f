"""Real networks nobody wrote for this tool.

In CI, from inside the ``onnx`` package: the ONNX Model Zoo classics (``light_*``, opset 9,
IR 3, ``ConstantOfShape`` weights, initializers listed as inputs) as shipped, against the
output bundled with them, and with seeded random weights, with parity of every output and of
every conv; the pytorch-converted single-layer cases and onnx's operator cases with their
bundled inputs and outputs. Under ``-m zoo``: the heaviest classics with random weights, and
the PyPI-wheel models that ``tools/fetch_zoo.py`` caches (skipped when the cache is empty).
"""

from __future__ import annotations

import importlib
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_convfc import rewrite_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fetch_zoo  # noqa: E402
import zoo_parity  # noqa: E402

DATA = zoo_parity.ONNX_DATA
# Their fully connected layers hold 60-140 M random weights: tens of seconds each.
HEAVY = ("bvlc_alexnet", "vgg19", "zfnet512")
# onnx's own tolerances for the classics (onnx.backend.test.case.model).
BUNDLED_RTOL = {"densenet121": 2e-3}
CONV_FAMILY = ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv")
NODE_CASE_MODULES = ("conv", "convtranspose", "convinteger", "qlinearconv")


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _left(model: onnx.ModelProto) -> set[str]:
    """Conv-family op types still in the main graph."""
    return {n.op_type for n in model.graph.node if n.op_type in CONV_FAMILY}


def _check_coverage(model: onnx.ModelProto, report) -> None:
    """Every Conv lowered; other conv-family ops may still wait for their lowering."""
    left = _left(model)
    assert "Conv" not in left, [(r.node, r.reason) for r in report.skipped]
    if left:
        pytest.skip(f"{', '.join(sorted(left))} left as is: "
                    f"{'; '.join(r.reason for r in report.skipped) or 'no lowering yet'}")


def _close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    scale = max(1.0, float(np.abs(want).max(initial=0)))
    err = float(np.abs(got.astype(np.float64) - want).max(initial=0))
    assert err <= rel * scale, f"max_abs={err:.2e} > {rel:g} * {scale:.3g}"


# ---------------------------------------------------------------- Model Zoo classics

def _classic(name: str, random_weights: bool) -> zoo_parity.ZooModel:
    return next(m for m in zoo_parity.classic_models()
                if m.name.startswith(name) and m.random_weights == random_weights)


@pytest.mark.parametrize("name", zoo_parity.CLASSICS)
def test_classic_as_shipped_matches_its_bundled_output(name):
    path = DATA / "light" / f"light_{name}.onnx"
    model = onnx.load(path)
    rewritten, report = rewrite_model(model)
    onnx.checker.check_model(rewritten)
    assert report.rows and len(report.rewritten) == len(report.rows)
    notes = " | ".join(report.notes)
    assert "listed as graph inputs" in notes and "folded" in notes
    assert "opset from 9 to 11" in notes and "IR version from 3" in notes
    # onnx's backend test feeds arange(n) / n to the one real input (runner.generate_dummy_data)
    session = _session(rewritten)
    (feed,) = session.get_inputs()
    n = int(np.prod(feed.shape))
    x = (np.arange(n).reshape(feed.shape) / n).astype(np.float32)
    got = session.run(None, {feed.name: x})[0]
    want = numpy_helper.to_array(onnx.load_tensor(str(path).replace(".onnx", "_output_0.pb")))
    np.testing.assert_allclose(got, want, rtol=BUNDLED_RTOL.get(name, 1e-3), atol=1e-7)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.zoo) if n in HEAVY else n
                                  for n in zoo_parity.CLASSICS])
def test_classic_with_random_weights_keeps_parity(name):
    row = zoo_parity.check_model(_classic(name, True), fetch_zoo.cache_dir(), bench=False)
    assert row.problem is None, row.problem
    assert row.rewritten == row.total > 0, row.not_rewritten
    assert row.parity == "ok", row.not_rewritten
    assert row.worst_conv_rel <= 1e-4


def test_random_weights_replace_every_constant_fill():
    model = onnx.load(DATA / "light" / "light_squeezenet.onnx")
    randomized = zoo_parity.with_random_weights(model, seed=1)
    assert "ConstantOfShape" not in {n.op_type for n in randomized.graph.node}
    weights = {t.name: numpy_helper.to_array(t) for t in randomized.graph.initializer}
    conv_weights = [weights[n.input[1]] for n in randomized.graph.node if n.op_type == "Conv"]
    assert len(conv_weights) == 26 and all(w.std() > 0 for w in conv_weights)
    again = zoo_parity.with_random_weights(model, seed=1)
    assert again.SerializeToString() == randomized.SerializeToString()


# ---------------------------------------------------------------- single-layer cases

def _bundled_cases() -> list[Path]:
    folders = sorted((DATA / "pytorch-converted").glob("test_Conv*"))
    folders += sorted((DATA / "pytorch-operator").glob("test_operator_conv*"))
    return folders


@pytest.mark.parametrize("folder", _bundled_cases(), ids=lambda p: p.name)
def test_pytorch_converted_case(folder):
    model = onnx.load(folder / "model.onnx")
    data = folder / "test_data_set_0"
    inputs = [numpy_helper.to_array(onnx.load_tensor(p))
              for p in sorted(data.glob("input_*.pb"))]
    (want,) = [numpy_helper.to_array(onnx.load_tensor(p)) for p in data.glob("output_*.pb")]
    rewritten, report = rewrite_model(model)
    onnx.checker.check_model(rewritten, full_check=True)
    session = _session(rewritten)
    got = session.run(None, dict(zip((i.name for i in session.get_inputs()), inputs)))[0]
    _close(got, want, 1e-4)
    _check_coverage(rewritten, report)


def _node_cases() -> list:
    """onnx's operator cases for the conv family, rebuilt by their generators.

    Importing a case module runs its exporters, which append to the package's private
    ``_NodeTestCases``; ``collect_testcases`` would do the same for every operator (~15 s).
    """
    package = importlib.import_module("onnx.backend.test.case.node")
    for name in NODE_CASE_MODULES:
        importlib.import_module(f"onnx.backend.test.case.node.{name}")
    return [c for c in getattr(package, "_NodeTestCases", [])
            if c.model.graph.node[0].op_type in CONV_FAMILY]


def _with_constant_operands(case) -> onnx.ModelProto:
    """The case's model with every input but the first turned into an initializer."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    inputs, _ = case.data_sets[0]
    graph = model.graph
    for value, array in list(zip(graph.input, inputs))[1:]:
        graph.initializer.append(numpy_helper.from_array(np.asarray(array), value.name))
    del graph.input[1:]
    return model


@pytest.mark.parametrize("case", _node_cases(), ids=lambda c: c.name)
def test_onnx_operator_case(case):
    model = _with_constant_operands(case)
    inputs, outputs = case.data_sets[0]
    rewritten, report = rewrite_model(model)
    onnx.checker.check_model(rewritten, full_check=True)
    got = _session(rewritten).run(None, {model.graph.input[0].name: inputs[0]})[0]
    want = np.asarray(outputs[0])
    if want.dtype.kind in "iu":  # integer convs: exact
        np.testing.assert_array_equal(got, want)
    else:
        _close(got, want, 1e-4)
    _check_coverage(rewritten, report)


# ---------------------------------------------------------------- PyPI-wheel models

@pytest.mark.zoo
@pytest.mark.parametrize("entry", zoo_parity.WHEEL_MODELS, ids=lambda e: e.name)
def test_zoo_model(entry):
    cache = fetch_zoo.cache_dir()
    if not entry.file(cache).is_file():
        pytest.skip(f"{entry.path} is not in the zoo cache {cache}; run "
                    "python tools/fetch_zoo.py (or set $ONNX_CONVFC_ZOO)")
    row = zoo_parity.check_model(entry, cache, bench=False)
    assert row.problem is None, row.problem
    assert row.parity == "ok", row.not_rewritten
    assert "Conv" not in row.uncovered_ops, row.not_rewritten
    if row.uncovered_ops:
        pytest.xfail(f"not lowered yet: {'; '.join(row.not_rewritten)}")
    assert row.rewritten == row.total > 0



# ---------------------------------------------------------------- the fetch script

def test_fetch_keeps_only_onnx_members_and_refuses_unsafe_names(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch_zoo.CACHE_ENV, str(tmp_path / "cache"))
    assert fetch_zoo.cache_dir() == tmp_path / "cache"
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/models/net.onnx", b"model bytes")
        archive.writestr("pkg/__init__.py", b"")
    fetch_zoo._extract_onnx_members(wheel, tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix()
            for p in (tmp_path / "out").rglob("*") if p.is_file()] == ["pkg/models/net.onnx"]
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("../evil.onnx", b"x")
    with pytest.raises(fetch_zoo.FetchError, match="unsafe member name"):
        fetch_zoo._extract_onnx_members(wheel, tmp_path / "again")
    assert not (tmp_path / "evil.onnx").exists()
