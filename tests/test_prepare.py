"""Load and prepare: external data in and out, bad files, old opsets, initializers listed as
inputs, weight cones folded into initializers, weights that cannot be folded, conv dtypes."""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_convfc import io, rewrite_model
from onnx_convfc.cli import main
from onnx_convfc.io import InputError, load_model, read_model, save_model
from onnx_convfc.prepare import MIN_OPSET, prepare_model

RNG = np.random.default_rng(3)
M, C = 16, 8  # the weight is 4.5 KiB, over io.EXTERNAL_MIN_BYTES
W = RNG.standard_normal((M, C, 3, 3)).astype(np.float32)
BIAS = RNG.standard_normal(M).astype(np.float32)
X_SHAPE = [1, C, 7, 7]
Y_SHAPE = [1, M, 7, 7]


def _conv_graph_model(nodes, initializers, weight="W", bias=None, opset=17, ir=8,
                      elem=TensorProto.FLOAT, inputs=()):
    """``nodes`` (which compute ``weight``) followed by one 3x3 conv ``X -> Y``."""
    conv = helper.make_node("Conv", ["X", weight] + ([bias] if bias else []), ["Y"],
                            name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [*nodes, conv], "g", [helper.make_tensor_value_info("X", elem, X_SHAPE), *inputs],
        [helper.make_tensor_value_info("Y", elem, Y_SHAPE)], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def _plain_model():
    return _conv_graph_model([], [numpy_helper.from_array(W, "W"),
                                  numpy_helper.from_array(BIAS, "B")], bias="B")


def _run(model, feeds):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _x(dtype=np.float32):
    return RNG.standard_normal(X_SHAPE).astype(dtype)


def _assert_parity(original, rewritten, feeds=None, rel=1e-4):
    feeds = feeds or {"X": _x()}
    want, got = _run(original, feeds), _run(rewritten, feeds)
    err = float(np.abs(want.astype(np.float64) - got).max())
    assert err <= rel * max(1.0, float(np.abs(want).max())), f"max_abs={err:.2e}"


# ---------------------------------------------------------------- loading and saving

def _external_copy(tmp_path: Path, name="m.onnx", location="weights.bin") -> Path:
    """The plain model saved by onnx with its tensors in ``location`` beside it."""
    path = tmp_path / name
    onnx.save_model(_plain_model(), path, save_as_external_data=True, location=location,
                    size_threshold=0)
    return path


def _set_location(path: Path, location: str) -> None:
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def test_external_data_is_read_from_beside_the_model(tmp_path):
    loaded = read_model(_external_copy(tmp_path))
    assert loaded.external_data
    weights = {t.name: numpy_helper.to_array(t) for t in loaded.model.graph.initializer}
    np.testing.assert_array_equal(weights["W"], W)
    assert not read_model(tmp_path / "m.onnx").model.graph.initializer[0].external_data
    save_model(_plain_model(), tmp_path / "inline.onnx")
    assert not read_model(tmp_path / "inline.onnx").external_data


def test_save_with_external_data_is_atomic_and_leaves_the_model_unchanged(tmp_path):
    model = _plain_model()
    before = model.SerializeToString()
    save_model(model, tmp_path / "out.onnx", external_data=True)
    assert model.SerializeToString() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert (tmp_path / "out.onnx").stat().st_size < W.nbytes  # the weight went to .data
    loaded = read_model(tmp_path / "out.onnx")
    assert loaded.external_data
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.model.graph.initializer[0]), W)
    _assert_parity(model, loaded.model)
    x = _x()  # onnxruntime reads the written layout itself, from the path
    by_path = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(by_path.run(None, {"X": x})[0], _run(model, {"X": x}))


def test_save_switches_to_external_data_past_the_protobuf_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1000)
    save_model(_plain_model(), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size >= W.nbytes
    assert read_model(tmp_path / "big.onnx").external_data


def test_failed_save_leaves_the_old_file_and_no_temporaries(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")

    def refuse(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(InputError, match="cannot write"):
        save_model(_plain_model(), target, external_data=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert target.read_bytes() == b"old"


@pytest.mark.parametrize("bad", ["missing", "absolute", "parent", "symlink", "short", "length"])
def test_bad_external_data_is_refused_with_one_line(tmp_path, bad):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _external_copy(folder)
    data = folder / "weights.bin"
    outside = tmp_path / "outside.bin"
    outside.write_bytes(data.read_bytes())
    expected = {"missing": "is missing", "absolute": "is absolute",
                "parent": "leads outside the model's folder",
                "symlink": "leads outside the model's folder", "short": "is short",
                "length": "does not match"}[bad]
    if bad == "missing":
        data.unlink()
    elif bad == "absolute":
        _set_location(path, str(outside))
    elif bad == "parent":
        _set_location(path, "../outside.bin")
    elif bad == "symlink":
        data.unlink()
        os.symlink(outside, data)
    elif bad == "short":
        data.write_bytes(data.read_bytes()[:-10])
    else:
        model = onnx.load(path, load_external_data=False)
        entry = next(e for e in model.graph.initializer[0].external_data if e.key == "length")
        entry.value = str(int(entry.value) + 4)
        path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=expected) as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_truncated_protobuf_is_refused(tmp_path):
    whole = _plain_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="not a readable ONNX model"):
        load_model(path)


def _damage(change):
    """The plain model with its 4.5 KiB weight (a placeholder of the weightless copy the
    checker gets) changed."""
    model = _plain_model()
    change(model.graph.initializer[0])
    return model


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.dims.__setitem__(0, 17), r"raw_data holds 4608, too small .* \(4896 required"),
    (lambda t: t.dims.__setitem__(slice(0, 2), [-16, -8]), "negative dimension"),
    (lambda t: t.float_data.extend([1.0]), "in one field, holds it in 2"),
    (lambda t: t.ClearField("raw_data"), "in one field, holds it in 0"),
    (lambda t: (t.ClearField("raw_data"), t.int64_data.extend(range(M * C * 9))),
     "belongs in 'float_data', not 'int64_data'"),
    (lambda t: (t.ClearField("raw_data"), t.float_data.extend([0.5] * 100)),
     r"float_data holds 100, too small .* \(1152 required"),
])
def test_large_tensors_get_the_checkers_data_checks(change, expected):
    with pytest.raises(InputError, match=expected) as err:
        io.check_structure(_damage(change), "m.onnx")
    assert str(err.value).startswith("m.onnx: not a valid ONNX model (tensor 'W': ")
    assert "\n" not in str(err.value)


def test_large_tensor_in_a_typed_field_passes_and_the_model_is_left_alone():
    model = _damage(lambda t: (t.ClearField("raw_data"), t.float_data.extend(W.ravel())))
    before = model.SerializeToString()
    io.check_structure(model)
    assert model.SerializeToString() == before


def test_cli_keeps_external_data_and_writes_nothing_on_error(tmp_path, capsys):
    src = _external_copy(tmp_path)
    assert main(["rewrite", str(src), "-o", str(tmp_path / "out.onnx"), "--quiet"]) == 0
    assert (tmp_path / "out.onnx.data").is_file()
    rewritten = load_model(tmp_path / "out.onnx")
    _assert_parity(load_model(src), rewritten)

    (tmp_path / "weights.bin").unlink()
    assert main(["rewrite", str(src), "-o", str(tmp_path / "again.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is missing" in err and "Traceback" not in err
    assert not (tmp_path / "again.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- old models

@pytest.mark.parametrize("opset", [7, 8, 9, 10])
def test_old_opset_and_listed_initializers(opset):
    model = _plain_model()
    model.opset_import[0].version = opset
    model.ir_version = 3
    model.graph.input.extend([helper.make_tensor_value_info("W", TensorProto.FLOAT, W.shape),
                              helper.make_tensor_value_info("B", TensorProto.FLOAT, [M])])
    onnx.checker.check_model(model)
    prepared, notes = prepare_model(model)
    assert [v.name for v in prepared.graph.input] == ["X"]
    assert prepared.opset_import[0].version == MIN_OPSET
    assert prepared.ir_version >= 6
    text = " | ".join(notes)
    assert "2 initializer(s) were also listed as graph inputs" in text
    assert f"opset from {opset} to {MIN_OPSET}" in text and "IR version from 3" in text
    rewritten, report = rewrite_model(model)
    onnx.checker.check_model(rewritten, full_check=True)
    assert len(report.rewritten) == 1
    _assert_parity(model, rewritten)


# ---------------------------------------------------------------- folding weight cones

def _cone(kind: str):
    """(nodes, initializers) computing ``W`` from constants in one of the usual ways."""
    init = numpy_helper.from_array
    if kind == "ConstantOfShape":
        return ([helper.make_node("ConstantOfShape", ["w_shape"], ["W"], name="fill",
                                  value=init(np.array([0.125], np.float32)))],
                [init(np.array(W.shape, np.int64), "w_shape")])
    if kind == "Constant+Reshape":
        return ([helper.make_node("Constant", [], ["w_flat"], value_floats=W.ravel().tolist()),
                 helper.make_node("Constant", [], ["w_shape"], value_ints=list(W.shape)),
                 helper.make_node("Reshape", ["w_flat", "w_shape"], ["W"], name="reshape")], [])
    if kind == "Cast":
        return ([helper.make_node("Cast", ["w16"], ["W"], to=TensorProto.FLOAT, name="cast")],
                [init(W.astype(np.float16), "w16")])
    if kind == "DequantizeLinear":
        scale = np.abs(W).reshape(M, -1).max(axis=1) / 127
        q = np.round(W / scale[:, None, None, None]).astype(np.int8)
        return ([helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["W"],
                                  axis=0, name="dq")],
                [init(q, "wq"), init(scale.astype(np.float32), "w_scale"),
                 init(np.zeros(M, np.int8), "w_zp")])
    if kind == "Transpose":
        return ([helper.make_node("Transpose", ["w_t"], ["W"], perm=[3, 2, 1, 0], name="t")],
                [init(np.ascontiguousarray(W.transpose(3, 2, 1, 0)), "w_t")])
    assert kind == "Squeeze"
    return ([helper.make_node("Squeeze", ["w_5d", "axis"], ["W"], name="squeeze")],
            [init(W[None], "w_5d"), init(np.array([0]), "axis")])


@pytest.mark.parametrize("kind", ["ConstantOfShape", "Constant+Reshape", "Cast",
                                  "DequantizeLinear", "Transpose", "Squeeze"])
def test_weight_cones_are_folded_and_removed(kind):
    nodes, inits = _cone(kind)
    model = _conv_graph_model(nodes, inits)
    onnx.checker.check_model(model, full_check=True)
    rewritten, report = rewrite_model(model)
    onnx.checker.check_model(rewritten, full_check=True)
    assert len(report.rewritten) == 1, report.rows
    assert any("folded 1 conv weight/bias" in n for n in report.notes), report.notes
    assert all(n.name.startswith("conv/convfc/") for n in rewritten.graph.node)
    assert {t.name for t in inits}.isdisjoint(t.name for t in rewritten.graph.initializer)
    _assert_parity(model, rewritten)


def test_only_the_weight_cone_is_evaluated():
    """A constant subgraph that feeds something else than a conv weight stays as it is."""
    nodes, inits = _cone("ConstantOfShape")
    offset = helper.make_node("ConstantOfShape", ["y_shape"], ["offset"], name="offset",
                              value=numpy_helper.from_array(np.array([0.5], np.float32)))
    model = _conv_graph_model(nodes + [offset], inits + [
        numpy_helper.from_array(np.array(Y_SHAPE, np.int64), "y_shape")])
    model.graph.node[-1].output[0] = "conv_out"
    model.graph.node.append(helper.make_node("Add", ["conv_out", "offset"], ["Y"]))
    prepared, _ = prepare_model(model)
    assert [n.name for n in prepared.graph.node if n.op_type == "ConstantOfShape"] == ["offset"]
    assert "y_shape" in {t.name for t in prepared.graph.initializer}
    rewritten, _ = rewrite_model(model)
    _assert_parity(model, rewritten)


def test_cone_shared_with_other_consumers_keeps_what_they_read():
    """``split`` feeds the conv weight and an Add: it stays, the conv reads a new constant."""
    halves = np.concatenate([W, W[:, :, :1]], axis=2)  # [M, C, 4, 3]: split 3 + 1 on axis 2
    split = helper.make_node("Split", ["w_both", "sizes"], ["W", "extra"], axis=2, name="split")
    flat = helper.make_node("ReduceSum", ["extra"], ["extra_sum"], keepdims=0)
    model = _conv_graph_model([split, flat], [numpy_helper.from_array(halves, "w_both"),
                                              numpy_helper.from_array(np.array([3, 1]), "sizes")])
    model.graph.output.append(helper.make_tensor_value_info("extra_sum", TensorProto.FLOAT, []))
    rewritten, report = rewrite_model(model)
    onnx.checker.check_model(rewritten, full_check=True)
    assert len(report.rewritten) == 1, report.rows
    assert "split" in {n.name for n in rewritten.graph.node}
    assert "w_both" in {t.name for t in rewritten.graph.initializer}
    feeds = {"X": _x()}
    for want, got in zip(_run_all(model, feeds), _run_all(rewritten, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _run_all(model, feeds):
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("dynamic", ["input", "random"])
def test_weight_that_cannot_be_folded_is_left_with_reason(dynamic):
    if dynamic == "input":
        make = helper.make_node("Mul", ["w0", "gain"], ["W"], name="scale_by_input")
        inputs = [helper.make_tensor_value_info("gain", TensorProto.FLOAT, [1])]
        expected = "depends on the graph input 'gain'"
    else:
        make = helper.make_node("RandomNormalLike", ["w0"], ["W"], name="noise")
        inputs = []
        expected = "RandomNormalLike 'noise', which cannot be folded"
    model = _conv_graph_model([make], [numpy_helper.from_array(W, "w0")], inputs=inputs)
    rewritten, report = rewrite_model(model, skip_runtime_weights=True)
    assert report.rows[0].reason == "weight 'W' is not constant"
    assert any(expected in n and "conv 'conv'" in n for n in report.notes), report.notes
    assert [n.op_type for n in rewritten.graph.node] == [make.op_type, "Conv"]
    if dynamic == "input":  # the unfolded cone still computes the weight at run time
        feeds = {"X": _x(), "gain": np.array([0.5], np.float32)}
        np.testing.assert_array_equal(_run(rewritten, feeds), _run(model, feeds))
        rewritten, report = rewrite_model(model)  # the default lowers it with a runtime weight
        assert make.name in {n.name for n in rewritten.graph.node}
        want, got = _run(model, feeds), _run(rewritten, feeds)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---------------------------------------------------------------- conv dtypes

def _typed_model(dtype, elem):
    return _conv_graph_model([], [numpy_helper.from_array(W.astype(dtype), "W"),
                                  numpy_helper.from_array(BIAS.astype(dtype), "B")],
                             bias="B", elem=elem, opset=22 if elem == TensorProto.BFLOAT16
                             else 17, ir=10)


def test_fp16_conv_is_rewritten_and_runs():
    model = _typed_model(np.float16, TensorProto.FLOAT16)
    rewritten, report = rewrite_model(model)
    assert len(report.rewritten) == 1
    _assert_parity(model, rewritten, {"X": _x(np.float16)}, rel=1e-2)


def test_fp64_conv_is_rewritten_and_runs(reference_conv):
    """onnxruntime has no fp64 Conv on CPU; its lowered form runs and matches numpy."""
    model = _typed_model(np.float64, TensorProto.DOUBLE)
    rewritten, report = rewrite_model(model)
    assert len(report.rewritten) == 1
    x = _x(np.float64)
    got = _run(rewritten, {"X": x})
    assert got.dtype == np.float64
    want = reference_conv(x, W.astype(np.float64), BIAS.astype(np.float64), (1, 1), (1, 1),
                          (1, 1, 1, 1), 1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_bf16_conv_is_skipped_with_reason():
    model = _typed_model(ml_dtypes.bfloat16, TensorProto.BFLOAT16)
    rewritten, report = rewrite_model(model)
    assert not report.rewritten
    assert "bfloat16 weights: onnxruntime has no CPU MatMul" in report.rows[0].reason
    assert [n.op_type for n in rewritten.graph.node] == ["Conv"]


def test_computed_quantization_operands_are_folded_too():
    """Folding covers every operand role of ``families.py``: here QLinearConv's ``y_scale``."""
    from test_qlinearconv import qlinear_model

    model, feeds = qlinear_model((1, 4, 6, 6), 3, (3, 3))
    inits = model.graph.initializer
    (y_scale,) = [t for t in inits if t.name == "y_scale"]
    half = numpy_helper.to_array(y_scale) / 2
    inits.remove(y_scale)
    inits.extend([numpy_helper.from_array(half, "half"), numpy_helper.from_array(
        np.array(2, np.float32), "two")])
    model.graph.node.insert(0, helper.make_node("Mul", ["half", "two"], ["y_scale"], name="m"))
    rewritten, report = rewrite_model(model)
    assert [r.weights for r in report.rows] == ["constant"]
    assert any("folded 1 conv weight/bias" in n for n in report.notes), report.notes
    want, got = _run_all(model, feeds), _run_all(rewritten, feeds)
    np.testing.assert_array_equal(got[0], want[0])
