"""BatchNormalization after a lowered conv: folded into it, made Mul + Add, or kept; parity
with onnxruntime, graph output names kept, and BNs that must stay untouched."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from convmodels import run
from onnx import TensorProto, helper, numpy_helper

from onnx_convfc import check_parity, rewrite_model
from onnx_convfc.batchnorm import as_affine, fold

RNG = np.random.default_rng(11)
C, M = 8, 16


def _bn_model(rank=2, *, extra_reader=False, conv_has_bias=True, bn_first=False,
              training=False, opset=17):
    """X -> Conv -> BatchNormalization -> Relu -> Y (``bn_first``: X -> BN -> Conv -> Relu);
    ``extra_reader`` also makes the conv's output a graph output, so the BN is not its only
    reader; ``training``: the BN in training mode, with its running mean and variance."""
    kernel = (3,) * rank
    w = RNG.standard_normal((M, C, *kernel)).astype(np.float32)
    n = C if bn_first else M
    inits = [numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(RNG.uniform(0.5, 2, n).astype(np.float32), "gamma"),
             numpy_helper.from_array(RNG.standard_normal(n).astype(np.float32), "beta"),
             numpy_helper.from_array(RNG.standard_normal(n).astype(np.float32), "mean"),
             numpy_helper.from_array(RNG.uniform(0.1, 3, n).astype(np.float32), "var")]
    conv_inputs = ["X", "W"]
    if conv_has_bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(M).astype(np.float32), "B"))
        conv_inputs.append("B")
    conv = helper.make_node("Conv", conv_inputs, ["conv_out"], name="conv",
                            pads=[1] * (2 * rank))
    bn = helper.make_node("BatchNormalization", ["conv_out", "gamma", "beta", "mean", "var"],
                          ["bn_out"] + ["running_mean", "running_var"] * training, name="bn",
                          epsilon=1e-3, **({"training_mode": 1} if training else {}))
    nodes = [conv, bn, helper.make_node("Relu", ["bn_out"], ["Y"], name="relu")]
    if bn_first:
        bn.input[0], conv.input[0], nodes[2].input[0] = "X", "bn_out", "conv_out"
        nodes = [bn, conv, nodes[2]]
    x_shape = [1, C, *(7,) * rank]
    y_shape = [1, M, *(7,) * rank]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, y_shape))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "X", TensorProto.FLOAT, x_shape)], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, x_shape


def _assert_same_outputs(original, rewritten, x_shape):
    assert [o.name for o in rewritten.graph.output] == [o.name for o in original.graph.output]
    feeds = {"X": RNG.standard_normal(x_shape).astype(np.float32)}
    for want, got in zip(run(original, feeds), run(rewritten, feeds)):
        scale = max(1.0, float(np.abs(want).max()))
        assert float(np.abs(want.astype(np.float64) - got).max()) <= 1e-5 * scale


def _ops(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("conv_has_bias", [True, False])
def test_fold_puts_the_bn_into_the_lowered_conv(conv_has_bias):
    model, x_shape = _bn_model(conv_has_bias=conv_has_bias)
    rewritten, report = rewrite_model(model)  # fold is the default
    onnx.checker.check_model(rewritten, full_check=True)
    assert "BatchNormalization" not in _ops(rewritten) and "Conv" not in _ops(rewritten)
    produced = {o for n in rewritten.graph.node for o in n.output}
    assert "bn_out" in produced and "conv_out" not in produced
    assert {"gamma", "beta", "mean", "var", "W"}.isdisjoint(
        t.name for t in rewritten.graph.initializer)
    assert "BatchNormalization 'bn' folded in" in report.rewritten[0].note
    assert any("conv 'conv' writes 'bn_out'" in n for n in report.notes), report.notes
    _assert_same_outputs(model, rewritten, x_shape)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_bn_whose_conv_output_is_read_elsewhere_becomes_mul_add(rank):
    """The conv's output is a graph output too: folding would lose it, Mul + Add keeps it."""
    model, x_shape = _bn_model(rank, extra_reader=True)
    rewritten, report = rewrite_model(model)
    ops = _ops(rewritten)
    assert "BatchNormalization" not in ops and ops.count("Mul") >= 1
    assert "BatchNormalization(s) after lowered convs Mul + Add" in " ".join(report.notes)
    scale = next(t for t in rewritten.graph.initializer if t.name == "bn/convfc/scale")
    assert list(scale.dims) == [M] + [1] * rank
    _assert_same_outputs(model, rewritten, x_shape)


def test_affine_keeps_every_name():
    model, x_shape = _bn_model()
    rewritten, report = rewrite_model(model, batchnorm="affine")
    produced = {o for n in rewritten.graph.node for o in n.output}
    assert {"conv_out", "bn_out", "Y"} <= produced
    assert "BatchNormalization" not in _ops(rewritten)
    assert report.rewritten[0].note is None or "folded" not in report.rewritten[0].note
    _assert_same_outputs(model, rewritten, x_shape)


def test_fold_keeps_the_name_of_a_graph_output_written_by_the_bn():
    """X -> Conv -> BN -> Y: the lowered conv writes the graph output ``Y`` itself."""
    model, x_shape = _bn_model()
    model.graph.node.pop()  # the Relu
    model.graph.node[-1].output[0] = "Y"
    rewritten, report = rewrite_model(model)
    assert "BatchNormalization 'bn' folded in" in report.rewritten[0].note
    assert [n.op_type for n in rewritten.graph.node][-1] == "Transpose"
    assert rewritten.graph.node[-1].output[0] == "Y"
    _assert_same_outputs(model, rewritten, x_shape)


def test_per_node_parity_compares_a_folded_conv_at_its_bn():
    model, _ = _bn_model()
    rewritten, _ = rewrite_model(model)
    report = check_parity(model, rewritten, per_node=True)
    assert report.passed and not report.unexposed
    (row,) = report.nodes
    assert (row.node, row.tensor, row.rewritten, row.passed) == ("conv", "bn_out", True, True)
    assert row.detail == "compared after BatchNormalization 'bn', which was folded into it"
    affine, _ = rewrite_model(model, batchnorm="affine")
    (row,) = check_parity(model, affine, per_node=True).nodes
    assert (row.tensor, row.detail) == ("conv_out", None)


def test_keep_leaves_the_bn():
    model, x_shape = _bn_model()
    rewritten, report = rewrite_model(model, batchnorm="keep")
    assert _ops(rewritten).count("BatchNormalization") == 1
    assert not any("BatchNormalization" in n for n in report.notes)
    _assert_same_outputs(model, rewritten, x_shape)


def test_bn_after_a_conv_left_as_conv_is_untouched():
    """onnxruntime folds that BN into the Conv itself."""
    model, x_shape = _bn_model()
    rewritten, report = rewrite_model(model, skip=("conv",))
    assert _ops(rewritten) == ["Conv", "BatchNormalization", "Relu"]
    assert not report.rewritten
    _assert_same_outputs(model, rewritten, x_shape)


def test_bn_not_fed_by_a_conv_is_untouched():
    model, x_shape = _bn_model(bn_first=True)
    rewritten, report = rewrite_model(model)
    assert len(report.rewritten) == 1
    bn = next(n for n in rewritten.graph.node if n.op_type == "BatchNormalization")
    assert list(bn.input) == ["X", "gamma", "beta", "mean", "var"]
    _assert_same_outputs(model, rewritten, x_shape)


def test_bn_in_training_mode_is_untouched():
    model, _ = _bn_model(training=True)
    rewritten, _ = rewrite_model(model)
    assert "BatchNormalization" in _ops(rewritten)
    assert "conv_out" in {o for n in rewritten.graph.node for o in n.output}


def test_bn_with_a_computed_scale_is_untouched():
    model, x_shape = _bn_model()
    model.graph.input.append(helper.make_tensor_value_info("gamma_in", TensorProto.FLOAT, [M]))
    model.graph.node.insert(0, helper.make_node("Identity", ["gamma_in"], ["gamma_run"]))
    model.graph.node[2].input[1] = "gamma_run"
    rewritten, _ = rewrite_model(model)
    assert "BatchNormalization" in _ops(rewritten)
    assert "conv_out" in {o for n in rewritten.graph.node for o in n.output}


def test_fold_matches_the_bn_formula_in_float64():
    w = RNG.standard_normal((M, C, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(M).astype(np.float32)
    gamma, beta, mean = (RNG.standard_normal(M) for _ in range(3))
    var = RNG.uniform(0.1, 2, M)
    params = {"g": gamma, "b": beta, "m": mean, "v": var}
    node = helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=1e-5)
    bn = as_affine(node, params.get, np.dtype(np.float32))
    new_w, new_b = fold(w, b, bn)
    scale = gamma / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(new_w, w * scale[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(new_b, (b - mean) * scale + beta, rtol=1e-5, atol=1e-6)
    assert new_w.dtype == np.float32 and new_b.dtype == np.float32


def test_scale_that_overflows_float16_is_refused():
    params = {"g": np.array([1e6]), "b": np.zeros(1), "m": np.zeros(1), "v": np.zeros(1)}
    node = helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"])
    assert as_affine(node, params.get, np.dtype(np.float16)) is None
    assert as_affine(node, params.get, np.dtype(np.float32)) is not None
