"""``onnx-convfc explain``: the dense matrix's numbers from the geometry, and its files.

The stated non-zeros must equal those counted in the built matrix (random weights are never
exactly zero), over strides, dilations, padding and groups. The PNG needs the ``plot`` extra;
without it the verb says which extra to install and exits 2.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import onnx
import pytest
from convfamily import node_model
from convmodels import conv_model, random_conv, run

from onnx_convfc.cli import main
from onnx_convfc.conv import conv_spec
from onnx_convfc.explain import dense_size, pooled_magnitude
from onnx_convfc.lowering.weights import dense_matrix

# input shape, out channels, kernel, attributes
GEOMETRIES = [
    ((1, 3, 9, 8), 5, (3, 3), dict(pads=[1, 0, 2, 1])),
    ((1, 4, 11, 7), 6, (3, 2), dict(strides=[2, 1], dilations=[1, 2], pads=[1, 1, 0, 2],
                                    group=2)),
    ((1, 4, 10), 4, (5,), dict(auto_pad="SAME_LOWER", strides=[3], group=4)),
    ((1, 2, 5, 6, 4), 4, (2, 3, 2), dict(auto_pad="SAME_UPPER", strides=[1, 2, 1])),
    ((1, 3, 6, 6), 2, (6, 6), dict(auto_pad="VALID")),
]


def _conv(index: int, seed: int = 0):
    shape, m, kernel, attrs = GEOMETRIES[index]
    rng = np.random.default_rng(seed)
    w, b = random_conv(rng, shape[1], m, kernel, attrs.get("group", 1))
    return conv_model(shape, w, b, **attrs), w


def _saved(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return str(path)


@pytest.mark.parametrize("index", range(len(GEOMETRIES)))
def test_size_from_geometry_matches_the_built_matrix(index):
    model, w = _conv(index)
    spec = conv_spec(model.graph.node[0], w.shape, GEOMETRIES[index][0])
    matrix = dense_matrix(w, spec)
    size = dense_size(spec, w.itemsize)
    assert size.shape == matrix.shape
    assert size.bytes == matrix.nbytes
    assert size.nnz == np.count_nonzero(matrix)
    assert size.density == pytest.approx(np.count_nonzero(matrix) / matrix.size)


def test_explain_one_conv_states_the_numbers(tmp_path, capsys):
    model, w = _conv(1)
    assert main(["explain", _saved(tmp_path, model), "--node", "conv"]) == 0
    out = capsys.readouterr().out
    spec = conv_spec(model.graph.node[0], w.shape, GEOMETRIES[1][0])
    matrix = dense_matrix(w, spec)
    rows, cols = matrix.shape
    nnz = np.count_nonzero(matrix)
    assert f"B shape     [{rows}, {cols}]" in out
    assert f"C*H*W = 4*11*7 = {rows}" in out and f"M*OH*OW = 6*{spec.output_spatial()[0]}*" in out
    assert f"= {matrix.nbytes} B" in out
    # M * C/g * in-bounds pairs, with the per-axis factors shown
    pairs = nnz // (6 * 2)
    assert f"6 * 2 * {pairs} = {nnz}" in out
    factors = [int(v) for v in re.findall(r"-> (\d+)\n", out)]
    assert len(factors) == 2 and factors[0] * factors[1] == pairs
    assert f"{nnz / matrix.size:.4%}" in out
    assert "block-diagonal over 2 groups" in out


def test_explain_lists_every_conv_with_its_size(tmp_path, capsys):
    model, _ = _conv(0)
    assert main(["explain", _saved(tmp_path, model), "--max-dense-bytes", "100KiB"]) == 0
    out = capsys.readouterr().out
    row = r"conv\s+3->5 k3x3 p1,0,2,1\s+216x350\s+295\.3 KiB\s+(\d+)\s+([\d.]+)%\s+too big"
    nnz, density = re.search(row, out).groups()
    # H: 10 outputs x 3 taps, 4 in padding; W: 7 x 3, 1 in padding
    assert int(nnz) == 5 * 3 * (30 - 4) * (21 - 1) and float(density) == pytest.approx(10.32)
    assert main(["explain", _saved(tmp_path, model)]) == 0
    assert re.search(r"216x350 .* fits", capsys.readouterr().out)


def test_symbolic_spatial_dims_need_input_shape(tmp_path, capsys):
    model, _ = _conv(0)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    path = _saved(tmp_path, model)
    assert main(["explain", path]) == 0
    assert re.search(r"conv\s+3->5 k3x3 p1,0,2,1(\s+-){4}\s+dynamic", capsys.readouterr().out)
    assert main(["explain", path, "--node", "conv"]) == 2
    assert "spatial size is not static; fix it with --input-shape" in capsys.readouterr().err
    assert main(["explain", path, "--node", "conv", "--input-shape", "X:1x3x9x8"]) == 0
    assert "B shape     [216, 350]" in capsys.readouterr().out


def test_npz_exports_the_matrix(tmp_path, capsys):
    sparse = pytest.importorskip("scipy.sparse")
    model, w = _conv(2)
    target = tmp_path / "b.npz"
    assert main(["explain", _saved(tmp_path, model), "--node", "conv", "--npz", str(target)]) == 0
    assert "scipy.sparse CSR" in capsys.readouterr().out
    spec = conv_spec(model.graph.node[0], w.shape, GEOMETRIES[2][0])
    np.testing.assert_array_equal(sparse.load_npz(target).toarray(), dense_matrix(w, spec))


def test_npz_is_dense_without_scipy(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.sparse", None)
    model, w = _conv(2)
    target = tmp_path / "b.npz"
    assert main(["explain", _saved(tmp_path, model), "--node", "conv", "--npz", str(target)]) == 0
    assert "dense array (scipy not installed)" in capsys.readouterr().out
    spec = conv_spec(model.graph.node[0], w.shape, GEOMETRIES[2][0])
    np.testing.assert_array_equal(np.load(target)["matrix"], dense_matrix(w, spec))


def test_png_draws_the_structure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model, _ = _conv(3)
    target = tmp_path / "b.png"
    assert main(["explain", _saved(tmp_path, model), "--node", "conv", "--png", str(target)]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_the_plot_extra_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    model, _ = _conv(0)
    target = tmp_path / "b.png"
    code = main(["explain", _saved(tmp_path, model), "--node", "conv", "--png", str(target)])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install 'onnx-convfc[plot]'" in err and len(err.strip().splitlines()) == 1
    assert not target.exists()


@pytest.mark.parametrize("argv, message", [
    (["--node", "nope"], "no conv named 'nope'; the model's convs: conv"),
    (["--png", "x.png"], "add --node NAME"),
    (["--node", "conv", "--npz", "x.npz", "--max-dense-bytes", "1KiB"],
     "over --max-dense-bytes 1.0 KiB; raise it"),
])
def test_bad_requests_exit_2_with_one_line(tmp_path, capsys, argv, message):
    model, _ = _conv(0)
    assert main(["explain", _saved(tmp_path, model), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_pooling_keeps_the_largest_magnitude_per_block():
    matrix = np.zeros((2050, 10), np.float32)
    matrix[5, 3] = -7.0
    matrix[2049, 9] = 2.0
    image, factor = pooled_magnitude(matrix, max_pixels=1024)
    assert factor == 3 and image.shape == (684, 4)
    assert image[1, 1] == 7.0 and image[683, 3] == 2.0
    assert np.count_nonzero(image) == 2
    small, factor = pooled_magnitude(matrix[:100], max_pixels=1024)
    assert factor == 1 and small[5, 3] == 7.0


def _transpose_model(seed: int = 0):
    """One ConvTranspose 2->3, k3x2, stride 2x1, pads, output_padding."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2, 3, 3, 2)).astype(np.float32)
    node = onnx.helper.make_node("ConvTranspose", ["X", "W"], ["Y"], name="up", strides=[2, 1],
                                 pads=[1, 0, 0, 1], output_padding=[1, 0])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT,
                                                          [1, 2, 4, 5])],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "W")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w


def test_conv_transpose_matrix_is_the_layer_and_its_size_is_stated(tmp_path, capsys):
    model, w = _transpose_model()
    target = tmp_path / "b.npz"
    assert main(["explain", _saved(tmp_path, model), "--node", "up", "--npz", str(target)]) == 0
    out = capsys.readouterr().out
    if "dense array" in out:
        matrix = np.load(target)["matrix"]
    else:
        matrix = pytest.importorskip("scipy.sparse").load_npz(target).toarray()
    x = np.random.default_rng(1).standard_normal((1, 2, 4, 5)).astype(np.float32)
    expected = run(model, {"X": x})[0]
    np.testing.assert_allclose((x.reshape(1, -1) @ matrix).reshape(expected.shape), expected,
                               rtol=1e-5, atol=1e-5)
    rows, cols = matrix.shape
    assert f"B shape     [{rows}, {cols}]" in out
    assert f"= {np.count_nonzero(matrix)}\n" in out  # the stated non-zeros
    assert "transpose of the matrix of the conv" in out


def test_listing_names_the_ops_without_a_dense_form(tmp_path, capsys):
    x = np.zeros((1, 2, 5, 5), np.uint8)
    w = np.ones((3, 2, 3, 3), np.uint8)
    model = node_model("ConvInteger", [("X", x), ("W", w)], consts=("W",))
    path = _saved(tmp_path, model)
    assert main(["explain", path]) == 0
    assert re.search(r"node\s+2->3 k3x3(\s+-){4}\s+no dense form", capsys.readouterr().out)
    assert main(["explain", path, "--node", "node"]) == 2
    assert "ConvInteger has no dense matrix" in capsys.readouterr().err

