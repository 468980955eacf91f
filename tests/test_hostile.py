"""Hostile and broken inputs, resource guards, and fuzzing.

The contract for any file and flags handed to ``onnx-convfc rewrite``: exit 0, 1 or 2; on 2
exactly one stderr line ``onnx-convfc: error: ...`` (never an internal error) and nothing
written; never a traceback or an onnxruntime log line; never a hang or an allocation that
grows with declared (rather than real) sizes; an output, when written, passes onnx's checker
and loads in onnxruntime whenever the input does.

The fuzz tests run a few examples here (the file stays well under 40 s);
``python tools/fuzz.py --examples N`` runs the same properties with many more.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from convfamily import node_model
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_convfc import rewrite_model
from onnx_convfc.budget import ESTIMATES, estimate
from onnx_convfc.cli import main
from onnx_convfc.conv import conv_spec
from onnx_convfc.explain import axis_pairs
from onnx_convfc.families import FAMILIES
from onnx_convfc.io import check_structure, load_model
from onnx_convfc.lowering import im2col
from onnx_convfc.lowering.weights import tap_inputs
from onnx_convfc.options import RewriteOptions

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo_cnn.onnx"
DEMO_BYTES = DEMO.read_bytes()
EXAMPLES = int(os.environ.get("ONNX_CONVFC_FUZZ_EXAMPLES", "0"))  # tools/fuzz.py sets it
FUZZ = settings(deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def examples(default: int) -> settings:
    return settings(FUZZ, max_examples=EXAMPLES or default)


def cli(args: list, capfd) -> tuple[int, str, str]:
    """``main`` in-process; stdout and stderr as the process writes them (onnxruntime's C++
    logging included)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    out, err = capfd.readouterr()
    return code, out, err


def assert_contract(code: int, out: str, err: str, written: Path) -> None:
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in out + err, err
    assert not any(tag in err for tag in ("[E:onnxruntime", "[W:onnxruntime")), err  # log lines
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnx-convfc: error: "), err
        assert "internal error" not in err, err
        assert not written.exists()
    elif code == 1:  # --verify found a difference: the output is not written
        assert "parity failed: nothing written" in err, err
        assert not written.exists()
    else:
        check_structure(load_model(written), str(written))


def demo_copy() -> onnx.ModelProto:
    return onnx.load_from_string(DEMO_BYTES)


def conv_node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


def loads_in_onnxruntime(path_or_bytes) -> bool:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(str(path_or_bytes) if isinstance(path_or_bytes, Path)
                             else path_or_bytes, so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001
        return False
    return True


# ---------------------------------------------------------------- hostile files: exit 2

def _mutated(change) -> bytes:
    model = demo_copy()
    change(model)
    return model.SerializeToString()


def _external(folder: Path, location: str, data: bytes | None = None) -> bytes:
    """The demo with its first weight in external data at ``location`` (written when
    ``data`` is given)."""
    model = demo_copy()
    tensor = model.graph.initializer[0]
    raw = tensor.raw_data
    if data is not None:
        (folder / location).write_bytes(data(raw) if callable(data) else data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def _huge_dims(model):
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = 2**40


def _conv_transpose(strides) -> bytes:
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "W")
    node = helper.make_node("ConvTranspose", ["X", "W"], ["Y"], name="up", strides=strides)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "X", TensorProto.FLOAT, [1, 4, 8, 8])], [helper.make_tensor_value_info(
            "Y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]) \
        .SerializeToString()


HOSTILE = {  # name -> (the file's bytes from its folder, what the one line says)
    "random bytes": (lambda d: random.Random(0).randbytes(4096), "not a readable ONNX model"),
    "empty": (lambda d: b"", "not an ONNX model"),
    "truncated": (lambda d: DEMO_BYTES[: len(DEMO_BYTES) // 3], "not a readable ONNX model"),
    "text": (lambda d: b"ir_version: 8\ngraph { node { op_type: 'Conv' } }\n",
             "not a readable ONNX model"),
    "dangling input": (lambda d: _mutated(lambda m: m.graph.node[1].input.__setitem__(
        0, "nowhere")), "input 'nowhere' of node"),
    "duplicate output name": (lambda d: _mutated(lambda m: m.graph.node[3].output.__setitem__(
        0, "stem/relu_out")), "single static assignment"),
    "cycle": (lambda d: _mutated(lambda m: m.graph.node[0].input.__setitem__(
        0, "block1/expand_relu_out")), "topologically sorted"),
    "attribute of the wrong type": (lambda d: _mutated(lambda m: set_attr(
        m.graph.node[0], "group", "two")), "Mismatched attribute type"),
    "weight data shorter than its shape": (lambda d: _mutated(
        lambda m: m.graph.initializer[0].dims.__setitem__(0, 17)), "too small"),
    "no opset": (lambda d: _mutated(lambda m: m.ClearField("opset_import")), "opset_import"),
    "external data, absolute": (lambda d: _external(d, str(d / "w.bin"), b"\0" * 1728),
                                "is absolute"),
    "external data, escaping": (lambda d: _external(d, "../w.bin"), "outside the model's folder"),
    "external data, through a symlink": (
        lambda d: (os.symlink("/etc/hostname", d / "link.bin"), _external(d, "link.bin"))[1],
        "outside the model's folder"),
    "external data, short": (lambda d: _external(d, "w.bin", lambda raw: raw[:-8]), "is short"),
    "external data, a FIFO": (lambda d: (os.mkfifo(d / "w.bin"), _external(d, "w.bin"))[1],
                              "not a regular file"),
    # the stem's Slices add nothing that grows with the sizes, but onnxruntime's optimiser
    # fails on them: refused before any lowering's budget
    "huge declared dims": (lambda d: _mutated(_huge_dims), "more than any machine holds"),
    "huge declared width": (lambda d: _mutated(lambda m: setattr(
        m.graph.input[0].type.tensor_type.shape.dim[3], "dim_value", 2**40)),
        "more than any machine holds"),
    "ConvTranspose with huge strides": (lambda d: _conv_transpose([2**20, 2**20]),
                                        "--max-output-bytes"),
    "ConvTranspose with int64-overflowing strides": (lambda d: _conv_transpose([2**62, 2**62]),
                                                     "--max-output-bytes"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_file_is_one_line_and_exit_2(case, tmp_path, capfd):
    build, says = HOSTILE[case]
    src = tmp_path / "model.onnx"
    src.write_bytes(build(tmp_path))
    out = tmp_path / "out.onnx"
    before = sorted(p.name for p in tmp_path.iterdir())
    started = time.perf_counter()
    code, stdout, err = cli(["rewrite", src, "-o", out], capfd)
    assert code == 2, (stdout, err)
    assert_contract(code, stdout, err, out)
    assert says in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert time.perf_counter() - started < 20


@pytest.mark.parametrize("what", ["fifo", "folder"])
def test_model_path_that_is_no_regular_file_does_not_block(what, tmp_path, capfd):
    src = tmp_path / "model.onnx"
    os.mkfifo(src) if what == "fifo" else src.mkdir()
    code, out, err = cli(["rewrite", src, "-o", tmp_path / "out.onnx"], capfd)
    assert code == 2 and "not a regular file" in err
    assert_contract(code, out, err, tmp_path / "out.onnx")


def test_huge_declared_dims_are_explained_without_allocating(tmp_path, capfd):
    """explain states the sizes of matrices with 1e25 rows from the geometry; building one is
    refused by the dense budget."""
    src = tmp_path / "huge.onnx"
    src.write_bytes(_mutated(_huge_dims))
    code, out, err = cli(["explain", src], capfd)
    assert code == 0, err
    assert "too big" in out
    code, out, err = cli(["explain", src, "--node", "stem/conv"], capfd)
    assert code == 0, err
    assert f"= {3 * 2**80}, one per input value" in out
    code, out, err = cli(["explain", src, "--node", "stem/conv", "--npz", tmp_path / "b.npz"],
                         capfd)
    assert code == 2 and "over --max-dense-bytes" in err
    assert not (tmp_path / "b.npz").exists()


def test_huge_declared_dims_are_refused_before_any_budget(tmp_path, capfd):
    """Whatever the method: the conv's input could not exist, whatever its lowering adds."""
    src = tmp_path / "huge.onnx"
    src.write_bytes(_mutated(_huge_dims))
    for extra in (["--method", "dense"], ["--method", "dense", "--max-dense-bytes", "1e30"]):
        code, out, err = cli(["rewrite", src, "-o", tmp_path / "o.onnx", *extra], capfd)
        assert code == 2 and "more than any machine holds" in err, err
    code, out, err = cli(["rewrite", src, "-o", tmp_path / "o.onnx", "--skip", "*"], capfd)
    assert code == 0, err


def test_verify_refuses_random_inputs_of_a_huge_declared_shape(tmp_path, capfd):
    """A declared batch of 2**40 rewrites fine (no constant depends on it), but --verify
    would draw terabytes of random input: refused in one line, before anything is saved."""
    src, out = tmp_path / "batch.onnx", tmp_path / "out.onnx"
    src.write_bytes(_mutated(lambda m: setattr(
        m.graph.input[0].type.tensor_type.shape.dim[0], "dim_value", 2**40)))
    code, stdout, err = cli(["rewrite", src, "-o", out, "--verify"], capfd)
    assert code == 2 and "random data of shape 1099511627776x3x32x32" in err, err
    assert_contract(code, stdout, err, out)


def test_weight_folding_does_not_compute_gigabytes_for_a_tiny_model(tmp_path, capfd):
    """ConstantOfShape([64, 64, 8192, 8192]) as a conv weight: 1 KB of model asking for
    64 GiB. Folding refuses it from the inferred sizes; the conv is skipped with a reason."""
    shape = numpy_helper.from_array(np.array([64, 64, 8192, 8192], np.int64), "S")
    nodes = [helper.make_node("ConstantOfShape", ["S"], ["W"], value=helper.make_tensor(
        "v", TensorProto.FLOAT, [1], [1.0])), helper.make_node("Conv", ["X", "W"], ["Y"],
                                                              name="c")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "X", TensorProto.FLOAT, [1, 64, 8, 8])], [helper.make_tensor_value_info(
            "Y", TensorProto.FLOAT, [1, 64, 1, 1])], [shape])
    src = tmp_path / "fold.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    started = time.perf_counter()
    code, out, err = cli(["rewrite", src, "-o", tmp_path / "o.onnx", "--report-json",
                          tmp_path / "r.json"], capfd)
    assert code == 0, err
    assert time.perf_counter() - started < 10
    report = json.loads((tmp_path / "r.json").read_text())
    assert any("cannot fold 'W'" in n and "bytes folding may compute" in n
               for n in report["notes"])
    assert report["convs"][0]["lowering"] is None


# ---------------------------------------------------------------- contradicting attributes

CONTRADICTIONS = {  # name -> (conv, attribute, value or initializer change, reason fragment)
    "kernel_shape": ("stem/conv", "kernel_shape", [5, 5], "kernel_shape=[5, 5] contradicts"),
    "pads length": ("stem/conv", "pads", [1, 1, 1], "pads=[1, 1, 1] invalid"),
    "negative pads": ("stem/conv", "pads", [1, -1, 1, 1], "pads=[1, -1, 1, 1] invalid"),
    "group not dividing": ("block1/grouped", "group", 3, "group=3 does not divide"),
    "group zero": ("block1/grouped", "group", 0, "group=0 does not divide"),
    "group vs input channels": ("stem/conv", "group", 2, "input has 3 channels"),
    "zero stride": ("stem/conv", "strides", [0, 1], "strides=[0, 1] invalid"),
    "negative stride": ("stem/conv", "strides", [-1, 1], "strides=[-1, 1] invalid"),
    "strides length": ("stem/conv", "strides", [2], "strides=[2] invalid"),
    "zero dilation": ("stem/conv", "dilations", [1, 0], "dilations=[1, 0] invalid"),
    "negative dilation": ("stem/conv", "dilations", [-2, 1], "dilations=[-2, 1] invalid"),
    "unknown auto_pad": ("stem/conv", "auto_pad", "MIRROR", "unknown auto_pad='MIRROR'"),
    "kernel larger than the input": ("stem/conv", "dilations", [40, 40], "kernel is larger"),
    "weight of rank 2": ("stem/conv", "W", (16, 27), "weight has rank 2"),
    "bias of the wrong length": ("stem/conv", "B", (8, 2), "bias shape [8, 2]"),
}


@pytest.mark.parametrize("case", CONTRADICTIONS)
def test_contradicting_conv_is_skipped_with_its_reason(case, tmp_path, capfd):
    name, what, value, reason = CONTRADICTIONS[case]
    model = demo_copy()
    node = conv_node(model, name)
    if what in ("W", "B"):
        tensor = next(t for t in model.graph.initializer if t.name == f"{name}/{what}")
        tensor.dims[:] = value
    else:
        set_attr(node, what, value)
    src, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    code, stdout, err = cli(["rewrite", src, "-o", out, "--report-json", report], capfd)
    assert code == 0, err
    assert_contract(code, stdout, err, out)
    rows = {r["node"]: r for r in json.loads(report.read_text())["convs"]}
    assert rows[name]["lowering"] is None and reason in rows[name]["reason"], rows[name]
    assert conv_node(onnx.load(out), name).op_type == "Conv"  # left exactly as it was


# ---------------------------------------------------------------- originals onnxruntime refuses

def _single_conv(tmp_path: Path, dtype, **attrs) -> Path:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    model = node_model("Conv", [("X", np.zeros((1, 3, 9, 9), dtype)), ("W", w),
                                ("B", rng.standard_normal(4).astype(dtype))],
                       consts=("W", "B"), **attrs)
    path = tmp_path / "conv.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("dtype,attrs,why", [
    (np.float64, {}, "no float64 Conv kernel"),
    (np.float32, dict(auto_pad="SAME_UPPER", dilations=[2, 3], strides=[2, 1]),
     "refuses auto_pad=SAME_UPPER with dilations [2, 3]"),
    (np.float32, dict(auto_pad="SAME_LOWER", dilations=[2, 2]),
     "refuses auto_pad=SAME_LOWER with dilations [2, 2]"),
])
def test_original_onnxruntime_refuses_is_lowered_and_checked_against_onnx_reference(
        tmp_path, capfd, dtype, attrs, why):
    src = _single_conv(tmp_path, dtype, **attrs)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = cli(["rewrite", src, "-o", out, "--verify", "--report-json", report],
                            capfd)
    assert code == 0, stdout + err
    data = json.loads(report.read_text())
    assert any(why in n and "cannot run there" in n for n in data["notes"]), data["notes"]
    assert any("the original's outputs come from onnx.reference" in n
               for n in data["parity"]["notes"]), data["parity"]["notes"]
    assert data["parity"]["passed"] and data["parity"]["outputs"][0]["max_rel"] < 1e-6
    assert loads_in_onnxruntime(out)


def test_verification_that_cannot_run_writes_nothing(tmp_path, capfd):
    """An op of an unknown domain: neither onnxruntime nor onnx.reference runs the original,
    so --verify fails with one line, before anything is saved."""
    model = onnx.load(_single_conv(tmp_path, np.float32))
    model.graph.node.append(helper.make_node("Frobnicate", ["Y"], ["Z"], domain="com.example"))
    model.graph.output[0].name = "Z"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    src, out = tmp_path / "custom.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    code, stdout, err = cli(["rewrite", src, "-o", out, "--verify"], capfd)
    assert code == 2 and "onnx.reference cannot run it either" in err, err
    assert_contract(code, stdout, err, out)


# ---------------------------------------------------------------- garbage flag values

GARBAGE = [
    ["--input-shape", "input"], ["--input-shape", "input:1x3xAx4"],
    ["--input-shape", "input:-1x3x8x8"], ["--input-shape", "input:" + "9" * 25 + "x3x8x8"],
    ["--input-shape", "nope:1x3x8x8"], ["--input-shape", "input:1x3x8"],
    ["--input-shape", "input:1x4x8x8"], ["--max-dense-bytes", "lots"],
    ["--max-dense-bytes", "inf"], ["--max-dense-bytes", "nan"], ["--max-output-bytes", "-1"],
    ["--max-output-bytes", "1e400"], ["--method", "winograd"], ["--verify", "--atol", "x"],
    ["--verify", "--atol", "-1"], ["--verify", "--rtol", "nan"], ["--verify", "--rtol", "inf"],
    ["--verify", "--atol", "nosuch:1e-3"], ["--verify", "--runs", "0"],
    ["--verify", "--runs", "many"], ["--verify", "--seed", "x"],
    ["--verify", "--providers", "tpu"], ["--verify", "--inputs", "missing.npz"],
    ["--verify", "--input-value", "input:abc"], ["--only"], ["--inplace", "-o", "x.onnx"],
]


@pytest.mark.parametrize("flags", GARBAGE, ids=" ".join)
def test_garbage_flag_values_are_one_line_and_exit_2(flags, tmp_path, capfd):
    src = tmp_path / "demo.onnx"
    src.write_bytes(DEMO_BYTES)
    out = tmp_path / "demo.convfc.onnx"
    code, stdout, err = cli(["rewrite", src, *flags], capfd)
    assert code == 2, (flags, err)
    assert_contract(code, stdout, err, out)


# ---------------------------------------------------------------- resource guards

def test_output_budget_refuses_before_building(tmp_path, capfd, monkeypatch):
    from onnx_convfc.lowering import weights

    def no_building(*_):
        raise AssertionError("built a matrix the budget refuses")

    monkeypatch.setattr(weights, "dense_matrix", no_building)
    src = tmp_path / "demo.onnx"
    src.write_bytes(DEMO_BYTES)
    code, _, err = cli(["rewrite", src, "--method", "dense", "--max-dense-bytes", "1GiB",
                        "--max-output-bytes", "1MiB", "--input-shape", "input:1x3x32x32"],
                       capfd)
    assert code == 2 and "over --max-output-bytes 1.0 MiB" in err and "--skip" in err, err


def test_every_lowering_has_an_estimate():
    modules = {m for family in FAMILIES.values() for m in family.lowerings.values()}
    assert modules <= set(ESTIMATES)


def _estimate_case(op: str, group: int, kernel, spatial, dtype, **attrs):
    rng = np.random.default_rng(0)
    c, m = 2 * group * (16 if kernel != (1, 1) else 1), 3 * group
    if op == "ConvTranspose":
        w, x_shape = rng.standard_normal((c, m // group, *kernel)), (1, c, *spatial)
    else:
        w, x_shape = rng.standard_normal((m, c // group, *kernel)), (1, c, *spatial)
    return node_model(op, [("X", np.zeros(x_shape, dtype)), ("W", w.astype(dtype)),
                           ("B", np.zeros(m, dtype))], consts=("W", "B"), group=group, **attrs)


@pytest.mark.parametrize("op,group,kernel,method,attrs", [
    ("Conv", 1, (3, 3), "auto", {}), ("Conv", 1, (3, 3), "im2col", dict(strides=[2, 2])),
    ("Conv", 2, (3, 3), "auto", dict(pads=[1, 1, 1, 1])), ("Conv", 1, (1, 1), "auto", {}),
    ("Conv", 1, (3, 3), "dense", {}), ("Conv", 1, (12, 12), "fc", {}),
    ("Conv", 2, (3, 3), "auto", dict(dilations=[2, 2])),
    ("ConvTranspose", 1, (3, 3), "auto", dict(strides=[2, 2])),
    ("ConvTranspose", 2, (4, 4), "auto", dict(strides=[3, 2], pads=[1, 1, 0, 0])),
    ("ConvTranspose", 1, (3, 3), "dense", dict(strides=[2, 2])),
])
def test_estimates_bound_what_the_lowerings_add(op, group, kernel, method, attrs):
    """Each estimate covers the constants a lowering really adds plus its nodes, and stays
    within a small factor of them (a useful guard, not a blanket refusal)."""
    model = _estimate_case(op, group, kernel, (12, 12), np.float32, **attrs)
    rewritten, report = rewrite_model(model, method=method)
    (row,) = report.rows
    assert row.lowering is not None, row.reason
    family = FAMILIES[op]
    x_shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    weights = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    spec = family.build(model.graph.node[0], "node", tuple(model.graph.initializer[0].dims),
                        x_shape, {})
    guess = estimate(family.lowerings[row.lowering], spec, 4, RewriteOptions(method=method))
    added = rewritten.ByteSize() - (model.ByteSize() - weights)  # nodes and constants
    assert added <= guess <= 8 * added + 64 * 1024, (added, guess)


def test_estimate_covers_gather_indices_that_grow_with_the_feature_map():
    """A 3x3 conv with 32 channels: its Gather index parts grow with the sides of the feature
    map, whatever the weight; the estimate counts them, and refuses declared sides of 2**40
    before ``index_parts`` allocates terabytes."""
    weight = np.zeros((32, 32, 3, 3), np.float32)
    model = node_model("Conv", [("X", np.zeros((1, 32, 512, 512), np.float32)), ("W", weight)],
                       consts=("W",), pads=[1, 1, 1, 1])
    rewritten, report = rewrite_model(model, method="im2col")
    (row,) = report.rows
    assert "Gather" in {n.op_type for n in rewritten.graph.node}
    spec = conv_spec(model.graph.node[0], weight.shape, (1, 32, 512, 512))
    assert row.weight_bytes_after <= estimate(im2col, spec, 4, RewriteOptions()) \
        <= 4 * row.weight_bytes_after + 64 * 1024
    huge = conv_spec(model.graph.node[0], weight.shape, (1, 32, 2**40, 2**40))
    assert estimate(im2col, huge, 4, RewriteOptions()) > 2**40 * 8


@given(k=st.integers(1, 7), d=st.integers(1, 4), s=st.integers(1, 4), p=st.integers(0, 6),
       size=st.integers(1, 30))
@settings(FUZZ, max_examples=200)
def test_axis_pairs_closed_form_matches_the_tap_table(k, d, s, p, size):
    out = (size + 2 * p - (k - 1) * d - 1) // s + 1
    assume(out >= 1)
    node = helper.make_node("Conv", ["X", "W"], ["Y"], strides=[s], dilations=[d], pads=[p, p])
    spec = conv_spec(node, (1, 1, k), (1, 1, size))
    assert axis_pairs(k, d, s, p, size, out) == int((tap_inputs(spec)[0] >= 0).sum())
    big = 2**70  # Python ints: no int64 wrap-around
    assert axis_pairs(3, 1, 1, 1, big, big) == 3 * big - 2


# ---------------------------------------------------------------- fuzz: the CLI contract

def _byte_mutation(draw, data: bytearray) -> bytes:
    kind = draw(st.sampled_from(("flip", "truncate", "splice", "zeros", "header")))
    n = len(data)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, n - 1))])
    if kind == "header":  # the structure lives before and between the weights: hit it often
        at = draw(st.integers(0, min(n - 1, 600)))
        data[at] = draw(st.integers(0, 255))
        return bytes(data)
    at = draw(st.integers(0, n - 1))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, n - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "splice":
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    else:
        run = len(data[at:at + draw(st.integers(1, 256))])
        data[at:at + run] = bytes(run)
    return bytes(data)


INTS = st.one_of(st.integers(-3, 6), st.sampled_from([0, 2**31, 2**40, 2**62, -(2**62)]))
ATTRS = ("kernel_shape", "pads", "strides", "dilations", "group", "auto_pad", "output_padding")


def _field_mutation(draw, model: onnx.ModelProto) -> None:
    graph = model.graph
    kind = draw(st.sampled_from(("attribute", "input dims", "initializer dims",
                                 "initializer dtype", "node input", "op type", "drop node",
                                 "opset", "ir version", "drop initializer")))
    node = draw(st.sampled_from(list(graph.node)))
    if kind == "attribute":
        name = draw(st.sampled_from(ATTRS))
        value = draw(st.one_of(st.lists(INTS, max_size=5), INTS, st.sampled_from(
            ["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER", "FOO"]), st.none()))
        if isinstance(value, list) and not value:
            value = None
        set_attr(node, name, value)
    elif kind == "input dims":
        dim = draw(st.sampled_from(list(graph.input[0].type.tensor_type.shape.dim)))
        choice = draw(st.one_of(st.sampled_from([0, 1, 2, 7, 31, 2**20, 2**40]),
                                st.just("S"), st.none()))
        if isinstance(choice, int):
            dim.dim_value = choice
        elif choice:
            dim.dim_param = choice
        else:
            dim.Clear()
    elif kind == "initializer dims":
        tensor = draw(st.sampled_from(list(graph.initializer)))
        dims = list(tensor.dims)
        tensor.dims[:] = draw(st.one_of(st.permutations(dims), st.lists(
            st.integers(0, 40), min_size=1, max_size=5)))
    elif kind == "initializer dtype":
        tensor = draw(st.sampled_from(list(graph.initializer)))
        tensor.data_type = draw(st.sampled_from([TensorProto.INT32, TensorProto.UINT32,
                                                 TensorProto.DOUBLE, TensorProto.FLOAT16,
                                                 TensorProto.BFLOAT16, TensorProto.INT8,
                                                 TensorProto.UINT8, TensorProto.STRING]))
    elif kind == "node input" and node.input:
        names = sorted({i for n in graph.node for i in (*n.input, *n.output)} | {"", "ghost"})
        node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
    elif kind == "op type":
        node.op_type = draw(st.sampled_from(["Conv", "ConvTranspose", "ConvInteger",
                                             "QLinearConv", "Relu", "Identity"]))
    elif kind == "drop node":
        graph.node.remove(node)
    elif kind == "opset":
        model.opset_import[0].version = draw(st.sampled_from([1, 7, 9, 10, 11, 13, 17, 21,
                                                              23, 99]))
    elif kind == "ir version":
        model.ir_version = draw(st.sampled_from([1, 3, 4, 7, 8, 10, 11, 99]))
    elif kind == "drop initializer" and graph.initializer:
        graph.initializer.remove(draw(st.sampled_from(list(graph.initializer))))


FLAGS = st.lists(st.sampled_from([
    ("--method", "im2col"), ("--method", "dense"), ("--method", "fc"), ("--method", "pointwise"),
    ("--split-groups",), ("--input-shape", "input:2x3x16x16"), ("--verify",),
    ("--skip-runtime-weights",), ("--max-output-bytes", "64k")]), max_size=3, unique=True)


def _check_cli_contract(data: bytes, flags: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        src, out = Path(folder) / "in.onnx", Path(folder) / "out.onnx"
        src.write_bytes(data)
        with _Capture() as capture:
            try:
                code = main(["rewrite", str(src), "-o", str(out), "--quiet", *flags])
            except SystemExit as stop:
                code = stop.code
        assert_contract(code, *capture.text(), out)
        assert src.read_bytes() == data
        if code == 0 and loads_in_onnxruntime(src):
            assert loads_in_onnxruntime(out), f"the output of {flags} does not load, the input did"


class _Capture:
    """What the process writes to stdout and stderr, from Python and from onnxruntime's C++,
    usable inside a hypothesis example (the capfd fixture is function-scoped)."""

    def __enter__(self) -> _Capture:
        self.python = [contextlib.redirect_stdout(io.StringIO()),
                       contextlib.redirect_stderr(io.StringIO())]
        self.buffers = [r.__enter__() for r in self.python]
        self.files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
        self.saved = [os.dup(1), os.dup(2)]
        for fd, f in zip((1, 2), self.files):
            os.dup2(f.fileno(), fd)
        return self

    def __exit__(self, *exc) -> None:
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        for redirect in reversed(self.python):
            redirect.__exit__(*exc)

    def text(self) -> tuple[str, str]:
        found = []
        for buffer, f in zip(self.buffers, self.files):
            f.seek(0)
            found.append(buffer.getvalue() + f.read().decode(errors="replace"))
            f.close()
        return found[0], found[1]


@examples(150)
@given(data=st.data())
def test_fuzz_cli_on_damaged_bytes(data):
    damaged = _byte_mutation(data.draw, bytearray(DEMO_BYTES))
    flags = [f for group in data.draw(FLAGS, label="flags") for f in group]
    _check_cli_contract(damaged, flags)


@examples(200)
@given(data=st.data())
def test_fuzz_cli_on_mutated_fields(data):
    model = demo_copy()
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        if not model.graph.node:
            break
        _field_mutation(data.draw, model)
    flags = [f for group in data.draw(FLAGS, label="flags") for f in group]
    _check_cli_contract(model.SerializeToString(), flags)


# ---------------------------------------------------------------- fuzz: geometry vs kernels

LEVELS = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
INTEGER_OPS = ("ConvInteger", "QLinearConv")


@st.composite
def geometries(draw, op: str) -> dict:
    """Attributes and shapes of one conv-family node; small, every attribute exercised."""
    transpose = op == "ConvTranspose"
    rank = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(("g1", "grouped", "depthwise")))
    group = 1 if kind == "g1" else draw(st.integers(2, 3))
    per_in = 1 if kind == "depthwise" else draw(st.integers(1, 3))
    per_out = draw(st.integers(1, 3))
    c, m = group * per_in, group * per_out
    wide = rank < 3
    kernel = tuple(draw(st.integers(1, 4 if wide else 2)) for _ in range(rank))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilations = tuple(draw(st.integers(1, 3 if wide else 2)) for _ in range(rank))
    auto_pad = draw(st.sampled_from(("NOTSET",) * 3 + ("VALID", "SAME_UPPER", "SAME_LOWER")))
    attrs = dict(group=group, strides=list(strides), dilations=list(dilations))
    pads = [draw(st.integers(0, 2)) for _ in range(2 * rank)]
    if auto_pad == "NOTSET":
        attrs["pads"] = pads
    else:
        attrs["auto_pad"] = auto_pad
    spatial = []
    for i in range(rank):
        span = (kernel[i] - 1) * dilations[i] + 1
        least = 1 if transpose or auto_pad.startswith("SAME") else max(
            1, span - (pads[i] + pads[i + rank] if auto_pad == "NOTSET" else 0))
        spatial.append(least + draw(st.integers(0, 4 if wide else 2)))
    if transpose:
        padding = [draw(st.integers(0, s - 1)) for s in strides]
        if any(padding):
            attrs["output_padding"] = padding
        if auto_pad in ("NOTSET", "VALID"):  # the pads may crop the whole output
            cropped = pads if auto_pad == "NOTSET" else [0] * (2 * rank)
            assume(all((size - 1) * s + p + (k - 1) * d + 1 > cropped[i] + cropped[i + rank]
                       for i, (size, s, p, k, d) in enumerate(
                           zip(spatial, strides, padding, kernel, dilations))))
        w_shape = (c, per_out, *kernel)
    else:
        w_shape = (m, per_in, *kernel)
    return dict(op=op, rank=rank, c=c, m=m, attrs=attrs, w_shape=w_shape, spatial=spatial,
                batch=draw(st.integers(1, 2)), bias=draw(st.booleans()),
                mode=draw(st.sampled_from(("static", "dyn_batch", "dyn_all"))),
                runtime=draw(st.sampled_from((False,) * 3 + (True,))),
                level=draw(st.sampled_from(LEVELS)))


def _family_model(geo: dict, rng, data) -> tuple[onnx.ModelProto, dict, dict, list[str]]:
    """The node's model, its feeds, every operand by name, and the rewrite methods worth
    trying on it."""
    op, m, rank = geo["op"], geo["m"], geo["rank"]
    x_shape = (geo["batch"], geo["c"], *geo["spatial"])
    if op in INTEGER_OPS:
        xt = data.draw(st.sampled_from((np.uint8, np.int8)), label="x type")
        wt = data.draw(st.sampled_from((np.uint8, np.int8)), label="w type")
        x = rng.integers(np.iinfo(xt).min, np.iinfo(xt).max, x_shape, endpoint=True).astype(xt)
        w = rng.integers(-60, 60, geo["w_shape"]).astype(np.int16)
        w = (w + (128 if wt == np.uint8 else 0)).astype(wt)
        per_channel = data.draw(st.booleans(), label="per channel")
        w_zp = ((rng.integers(-5, 5, m if per_channel else ()) + (128 if wt == np.uint8 else 0))
                .astype(wt))
        x_zp = np.array(rng.integers(-5, 5) + (128 if xt == np.uint8 else 0), xt)
    else:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(geo["w_shape"]).astype(np.float32)
    if op == "ConvInteger":
        inputs = [("X", x), ("W", w), ("x_zp", x_zp), ("w_zp", np.asarray(w_zp))]
        weights = ("W", "x_zp", "w_zp")
    elif op == "QLinearConv":
        depth = int(np.prod(geo["w_shape"][1:]))
        w_scale = rng.uniform(0.002, 0.01, w_zp.shape).astype(np.float32)
        y_scale = np.float32(0.02 * 0.01 * 60 * 60 * math.sqrt(depth) / 40)
        inputs = [("X", x), ("x_scale", np.float32(0.02)), ("x_zp", x_zp), ("W", w),
                  ("w_scale", w_scale), ("w_zp", np.asarray(w_zp)), ("y_scale", y_scale),
                  ("y_zp", np.array(rng.integers(-5, 5) + (128 if xt == np.uint8 else 0), xt)),
                  ("B", rng.integers(-3000, 3000, m).astype(np.int32) if geo["bias"] else None)]
        weights = tuple(n for n, _ in inputs[1:])
    else:
        bias = rng.standard_normal(m).astype(np.float32) if geo["bias"] else None
        inputs, weights = [("X", x), ("W", w), ("B", bias)], ("W", "B")
    consts = () if geo["runtime"] else weights
    dims = {"static": None, "dyn_batch": {"X": ["N", *x_shape[1:]]},
            "dyn_all": {"X": ["N", x_shape[1], *[f"S{i}" for i in range(rank)]]}}[geo["mode"]]
    model = node_model(op, inputs, consts=consts, dims=dims, **geo["attrs"])
    feeds = {name: np.asarray(value) for name, value in inputs
             if value is not None and name not in consts}
    methods = {"Conv": ["auto", "im2col", "dense", "fc", "pointwise"],
               "ConvTranspose": ["auto", "dense"]}.get(op, ["auto"])
    return model, feeds, dict(inputs), methods


def _expected(geo: dict, model: onnx.ModelProto, feeds: dict,
              values: dict) -> np.ndarray | None:
    """onnxruntime's own kernel; where onnxruntime refuses the node (SAME_* with dilations,
    per-channel ConvInteger zero points, ...) onnx.reference's Conv, through exact float64
    arithmetic for the integer ops (its QLinearConv gets SAME_* with dilations wrong);
    ``None`` if neither runs it."""
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)[0]
    except Exception:  # noqa: BLE001
        event("expected from the reference: onnxruntime refuses the original")
    try:
        if geo["op"] in INTEGER_OPS:
            return _integer_reference(geo, values)
        return np.asarray(ReferenceEvaluator(model).run(None, feeds)[0])
    except Exception:  # noqa: BLE001
        return None


def _integer_reference(geo: dict, v: dict) -> np.ndarray:
    """ConvInteger's exact sum, and QLinearConv's requantization of it as the spec states:
    ``saturate(round_half_even(acc * (x_scale * w_scale / y_scale)) + y_zp)`` in float32."""
    m, rank = geo["m"], geo["rank"]
    per_channel = np.reshape(np.asarray(v["w_zp"], np.float64), (-1,) + (1,) * (rank + 1))
    x = np.asarray(v["X"], np.float64) - float(v["x_zp"])
    w = np.asarray(v["W"], np.float64) - per_channel
    conv = node_model("Conv", [("X", x), ("W", w)], consts=("W",), **geo["attrs"])
    acc = np.rint(ReferenceEvaluator(conv).run(None, {"X": x})[0]).astype(np.int64)
    if geo["op"] == "ConvInteger":
        return acc.astype(np.int32)
    channel = (1, m) + (1,) * rank
    if v.get("B") is not None:
        acc = acc + np.asarray(v["B"], np.int64).reshape(channel)
    scale = (np.float32(v["x_scale"]) * np.asarray(v["w_scale"], np.float32)
             / np.float32(v["y_scale"])).astype(np.float32)
    y = np.rint(acc.astype(np.float32) * np.broadcast_to(scale, (m,)).reshape(channel))
    info = np.iinfo(v["y_zp"].dtype)
    return np.clip(y + float(v["y_zp"]), info.min, info.max).astype(v["y_zp"].dtype)


def _check_family_geometry(geo: dict, data) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    model, feeds, values, methods = _family_model(geo, rng, data)
    expected = _expected(geo, model, feeds, values)
    assume(expected is not None)
    method = data.draw(st.sampled_from(methods), label="method")
    rewritten, report = rewrite_model(model, method=method)
    (row,) = report.rows
    event(f"lowering: {row.lowering or 'skipped, ' + method + ' does not apply'}")
    if row.lowering is None:  # only a method that cannot take this geometry may skip it,
        # or subpixel a ConvTranspose whose output lies (or, for some run-time size, may
        # lie) entirely in its padding (bias only)
        assert "entirely in the padding" in row.reason or (
            method not in ("auto", "im2col") and row.reason.startswith(
                f"{method} does not apply")), row.reason
        return
    assert geo["op"] not in {n.op_type for n in rewritten.graph.node}
    onnx.checker.check_model(rewritten)
    so = ort.SessionOptions()
    so.graph_optimization_level = geo["level"]
    so.intra_op_num_threads = 1
    so.log_severity_level = 4
    got = ort.InferenceSession(rewritten.SerializeToString(), so,
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.shape == expected.shape and got.dtype == expected.dtype, \
        (got.shape, expected.shape, got.dtype, expected.dtype)
    if geo["op"] in INTEGER_OPS:
        diff = np.abs(got.astype(np.int64) - expected.astype(np.int64)).max(initial=0)
        assert diff == 0, f"{row.lowering} {row.geometry}: off by {diff}"
    else:
        scale = max(1.0, float(np.abs(expected).max(initial=0)))
        err = float(np.abs(got - expected).max(initial=0)) / scale
        assert err <= 1e-4, f"{row.lowering} {row.geometry}: relative error {err:.2e}"


def _geometry_fuzz(op: str):
    @examples(100)
    @given(geo=geometries(op), data=st.data())
    def test(geo, data):
        _check_family_geometry(geo, data)

    test.__doc__ = f"Random {op} geometries, lowered and run by onnxruntime, against its kernel."
    return test


test_fuzz_conv_geometry = _geometry_fuzz("Conv")
test_fuzz_conv_transpose_geometry = _geometry_fuzz("ConvTranspose")
test_fuzz_conv_integer_geometry = _geometry_fuzz("ConvInteger")
test_fuzz_qlinear_conv_geometry = _geometry_fuzz("QLinearConv")
