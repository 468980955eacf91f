"""The command line, called in-process (``cli.main``) and once as ``python -m onnx_convfc``,
on the shipped demo model: exit codes, output paths, --only/--skip, the JSON report, and
one-line errors that write nothing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_convfc.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo_cnn.onnx"
DEMO_CONVS = {  # node -> what auto picks
    "stem/conv": "im2col", "block1/expand": "pointwise", "block1/grouped": "im2col",
    "block2/depthwise": "depthwise", "block2/project": "pointwise",
    "block3/depthwise_x2": "depthwise", "block3/pointwise": "pointwise",
    "head/classifier": "fc",
}


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``main`` and return (exit code, stdout, stderr); argparse exits count as returns."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def demo(tmp_path) -> Path:
    path = tmp_path / "demo_cnn.onnx"
    path.write_bytes(DEMO.read_bytes())
    return path


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def conv_names(path: Path) -> set[str]:
    return {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"}


def run_model(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


# --- the shipped model ---------------------------------------------------------------------

def test_demo_model_is_reproducible_and_small(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_models",
                                                  ROOT / "tools" / "make_demo_models.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "demo_cnn.onnx").read_bytes() == DEMO.read_bytes(), \
        "models/demo_cnn.onnx is stale: rerun python tools/make_demo_models.py"
    assert DEMO.stat().st_size < 300_000


def test_demo_model_covers_the_conv_kinds():
    model = onnx.load(str(DEMO))
    onnx.checker.check_model(model, full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    inits = {t.name: t.dims for t in model.graph.initializer}
    kinds = set()
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        m, c_per_group, *kernel = inits[node.input[1]]
        group = attrs.get("group", 1)
        kinds.add("1x1" if kernel == [1, 1] else "3x3")
        if max(attrs.get("strides", [1])) > 1 and kernel == [3, 3]:
            kinds.add("3x3 strided")
        if group > 1:
            kinds.add("grouped" if c_per_group > 1 else
                      "depthwise" if m == group else "depthwise x multiplier")
    assert kinds == {"1x1", "3x3", "3x3 strided", "grouped", "depthwise",
                     "depthwise x multiplier"}
    assert {n.op_type for n in model.graph.node} >= {"Add", "GlobalAveragePool", "Flatten"}
    assert model.doc_string and model.producer_name and model.metadata_props
    assert conv_names(DEMO) == set(DEMO_CONVS)


# --- rewrite -------------------------------------------------------------------------------

def test_rewrite_writes_beside_the_input_and_keeps_outputs(demo, capsys):
    before = demo.read_bytes()
    code, out, err = cli(["rewrite", demo], capsys)
    assert (code, err) == (0, "")
    written = demo.with_name("demo_cnn.convfc.onnx")
    assert f"wrote {written}" in out
    assert "rewrote 8/8 convs (depthwise 2, fc 1, im2col 2, pointwise 3)" in out
    assert demo.read_bytes() == before
    assert conv_names(written) == set()
    rng = np.random.default_rng(0)
    for batch in (1, 3):  # the symbolic batch dim stays symbolic
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        ref = run_model(demo, x)
        np.testing.assert_allclose(run_model(written, x), ref,
                                   atol=1e-4 * max(1.0, float(np.abs(ref).max())), rtol=0)


def test_inplace_replaces_the_input_and_leaves_no_temporary_file(demo, capsys):
    before = listing(demo.parent)
    code, _, err = cli(["rewrite", demo, "--inplace", "--quiet"], capsys)
    assert (code, err) == (0, "")
    assert sorted(listing(demo.parent)) == sorted(before)
    assert demo.read_bytes() != before[demo.name]
    assert conv_names(demo) == set()


def test_quiet_prints_only_the_summary(demo, tmp_path, capsys):
    code, out, _ = cli(["rewrite", demo, "-o", tmp_path / "q.onnx", "--quiet"], capsys)
    assert code == 0
    assert out.strip().splitlines() == [out.strip()]
    assert out.startswith("rewrote 8/8 convs")


@pytest.mark.parametrize("selection, lowered", [
    (["--skip", "block1/*"], set(DEMO_CONVS) - {"block1/expand", "block1/grouped"}),
    (["--skip", "pointwise"], {n for n, m in DEMO_CONVS.items() if m != "pointwise"}),
    (["--only", "im2col"], {n for n, m in DEMO_CONVS.items() if m == "im2col"}),
    (["--only", "head/*", "--only", "stem/conv"], {"head/classifier", "stem/conv"}),
    (["--only", "block2/*", "--skip", "*project"], {"block2/depthwise"}),
    (["--only", "pointwise", "--skip", "block3/*"], {"block1/expand", "block2/project"}),
    (["--only", "no/such/node"], set()),
], ids=["skip-glob", "skip-lowering", "only-lowering", "only-two-globs", "only-and-skip",
        "only-lowering-skip-glob", "only-nothing"])
def test_only_and_skip(selection, lowered, demo, tmp_path, capsys):
    out, report = tmp_path / "sel.onnx", tmp_path / "sel.json"
    code, _, err = cli(["rewrite", demo, "-o", out, "--report-json", report, *selection], capsys)
    assert (code, err) == (0, "")
    assert conv_names(out) == set(DEMO_CONVS) - lowered
    rows = {r["node"]: r for r in json.loads(report.read_text())["convs"]}
    assert {n for n, r in rows.items() if r["lowering"]} == lowered
    for name, row in rows.items():
        if name in lowered:
            assert row["lowering"] == DEMO_CONVS[name] and row["reason"] is None
        else:
            assert row["reason"].startswith(("excluded by --skip", "not selected by --only"))


def test_report_json_content(demo, tmp_path, capsys):
    report = tmp_path / "r.json"
    code, out, _ = cli(["rewrite", demo, "-o", tmp_path / "o.onnx", "--method", "im2col",
                        "--report-json", report], capsys)
    assert code == 0
    data = json.loads(report.read_text())
    assert data["total"] == 8 and data["rewritten"] == 8
    assert data["summary"].startswith("rewrote 8/8 convs (im2col 8) in ")
    assert data["summary"] in out
    assert isinstance(data["seconds"], float) and data["seconds"] >= 0
    model = onnx.load(str(demo))
    sizes = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    by_name = {r["node"]: r for r in data["convs"]}
    assert list(by_name) == [n.name for n in model.graph.node if n.op_type == "Conv"]
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        row = by_name[node.name]
        assert row["op_type"] == "Conv" and row["scope"] == "main"
        assert (row["lowering"], row["reason"]) == ("im2col", None)
        assert row["weight_bytes_before"] == sizes[node.input[1]] + sizes[node.input[2]]
        assert row["weight_bytes_after"] >= sizes[node.input[1]]
    assert by_name["stem/conv"]["geometry"] == "3->16 k3x3 s2x2 p1,1,1,1"
    assert by_name["block2/depthwise"]["geometry"] == "32->32 k3x3 s2x2 p1,1,1,1 g32"
    assert by_name["block3/depthwise_x2"]["geometry"] == "32->64 k3x3 s2x2 p0,0,1,1 g32"


def test_method_that_does_not_apply_skips_with_its_reason(demo, tmp_path, capsys):
    report = tmp_path / "r.json"
    code, _, _ = cli(["rewrite", demo, "-o", tmp_path / "o.onnx", "--method", "pointwise",
                      "--report-json", report], capsys)
    assert code == 0
    for row in json.loads(report.read_text())["convs"]:
        if DEMO_CONVS[row["node"]] in ("pointwise", "fc"):  # the 1x1 kernels
            assert row["lowering"] == "pointwise"
        else:
            assert row["reason"] == "pointwise does not apply: kernel 3x3 is not 1x1"


# --- inspect -------------------------------------------------------------------------------

def test_inspect_prints_the_plan_and_writes_nothing(demo, capsys):
    before = listing(demo.parent)
    code, out, err = cli(["inspect", demo], capsys)
    assert (code, err) == (0, "")
    assert listing(demo.parent) == before
    assert "rewrote 8/8 convs (depthwise 2, fc 1, im2col 2, pointwise 3)" in out


def test_inspect_shows_whole_node_names(demo, capsys):
    """The names are what --only/--skip take, so a piped table must not cut them."""
    _, out, _ = cli(["inspect", demo], capsys)
    for name in DEMO_CONVS:
        assert name in out


def test_inspect_report_json_is_the_plan(demo, tmp_path, capsys):
    report = tmp_path / "plan.json"
    code, _, _ = cli(["inspect", demo, "--report-json", report, "--skip", "head/*"], capsys)
    assert code == 0
    rows = {r["node"]: r["lowering"] for r in json.loads(report.read_text())["convs"]}
    assert rows == {**DEMO_CONVS, "head/classifier": None}
    assert sorted(p.name for p in demo.parent.iterdir()) == ["demo_cnn.onnx", "plan.json"]


# --- bad input: exit 2, one line on stderr, nothing written ---------------------------------

BAD = {
    "missing file": lambda d: ["rewrite", d.parent / "missing.onnx"],
    "not onnx": lambda d: ["rewrite", _write(d.parent / "text.onnx", b"not a model\n")],
    "empty file": lambda d: ["rewrite", _write(d.parent / "empty.onnx", b"")],
    "output folder missing": lambda d: ["rewrite", d, "-o", d.parent / "no" / "out.onnx"],
    "output is a folder": lambda d: ["rewrite", d, "-o", d.parent],
    "output is the input": lambda d: ["rewrite", d, "-o", d],
    "output is the input, spelled otherwise": lambda d: [
        "rewrite", d, "-o", d.parent / "." / ".." / d.parent.name / d.name],
    "inplace and -o": lambda d: ["rewrite", d, "--inplace", "-o", d.parent / "x.onnx"],
    "unknown method": lambda d: ["rewrite", d, "--method", "winograd"],
    "bad input shape": lambda d: ["rewrite", d, "--input-shape", "input:1xAx3"],
    "no verb": lambda d: [],
    "inspect missing file": lambda d: ["inspect", d.parent / "missing.onnx"],
    "inspect not onnx": lambda d: ["inspect", _write(d.parent / "t.onnx", b"\x08\x07junk")],
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, demo, capsys):
    args = BAD[case](demo)
    before = listing(demo.parent)
    code, out, err = cli(args, capsys)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("onnx-convfc: error: "), err
    assert "Traceback" not in err + out
    assert listing(demo.parent) == before


def test_unwritable_report_json_writes_no_model(demo, capsys):
    before = listing(demo.parent)
    code, _, err = cli(["rewrite", demo, "--report-json", demo.parent / "no" / "r.json"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert listing(demo.parent) == before


# --- help and the module entry point --------------------------------------------------------

def _verbs() -> list[str]:
    action = next(a for a in build_parser()._actions if a.dest == "verb")
    return sorted(action.choices)


@pytest.mark.parametrize("verb", _verbs())
def test_help_of_each_verb_shows_an_example(verb, capsys):
    code, out, _ = cli([verb, "--help"], capsys)
    assert code == 0
    assert "example:" in out
    assert f"onnx-convfc {verb} " in out


def test_python_dash_m_runs_the_cli(demo):
    out = demo.with_name("m.onnx")
    done = subprocess.run([sys.executable, "-m", "onnx_convfc", "rewrite", str(demo), "-o",
                           str(out), "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rewrote 8/8 convs")
    assert conv_names(out) == set()
    bad = subprocess.run([sys.executable, "-m", "onnx_convfc", "rewrite", str(demo.parent)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
