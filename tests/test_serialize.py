"""Weightless copies, piecewise saving and constant dedup: the parts that make rewriting cost
about a load and a save. Each must give back exactly the model it was given."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from convmodels import conv_model
from onnx import GraphProto, ModelProto, TensorProto, helper, numpy_helper

from onnx_convfc import io, rewrite_model
from onnx_convfc.emit import ConstantPool, NameScope
from onnx_convfc.io import read_model, save_model
from onnx_convfc.serialize import model_chunks
from onnx_convfc.skeleton import weightless_copy

RNG = np.random.default_rng(5)


def _model() -> ModelProto:
    """Large and small initializers, a large ``Constant`` node, and an ``If`` whose branch
    has an initializer of its own: every place a tensor can sit."""
    big = numpy_helper.from_array(RNG.standard_normal((64, 32)).astype(np.float32), "big")
    small = numpy_helper.from_array(np.array([2.0], np.float32), "small")
    const = helper.make_node("Constant", [], ["c"], name="const",
                             value=numpy_helper.from_array(
                                 RNG.standard_normal((32, 64)).astype(np.float32)))
    inner = numpy_helper.from_array(RNG.standard_normal((32, 64)).astype(np.float32), "inner")
    branch = helper.make_graph([helper.make_node("MatMul", ["m2", "inner"], ["b_out"])],
                               "branch", [], [helper.make_tensor_value_info(
                                   "b_out", TensorProto.FLOAT, [2, 64])], [inner])
    nodes = [const,
             helper.make_node("MatMul", ["X", "big"], ["m1"]),
             helper.make_node("MatMul", ["m1", "c"], ["m1c"]),
             helper.make_node("MatMul", ["m1c", "big"], ["m1b"]),
             helper.make_node("Mul", ["m1b", "small"], ["m2"]),
             helper.make_node("If", ["cond"], ["Y"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 64]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 64])], [big, small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="test", doc_string="kept")
    onnx.checker.check_model(model, full_check=True)
    return model


def test_weightless_copy_leaves_placeholders_and_fill_restores_the_model():
    model = _model()
    before = model.SerializeToString()
    copy, store = weightless_copy(model)
    assert model.SerializeToString() == before
    assert sorted(store) == ["big", "c"]  # "small" is small; "inner" is nested
    assert copy.ByteSize() < 20_000 < model.ByteSize()
    big = next(t for t in copy.graph.initializer if t.name == "big")
    assert list(big.dims) == [64, 32] and not big.HasField("raw_data")
    store.fill(copy.graph)
    assert copy == model


@pytest.mark.parametrize("external", [False, True])
def test_piecewise_save_reads_back_as_the_same_model(tmp_path, external):
    model = _model()
    before = model.SerializeToString()
    save_model(model, tmp_path / "m.onnx", external_data=external)
    assert model.SerializeToString() == before
    loaded = read_model(tmp_path / "m.onnx")
    assert loaded.external_data == external
    assert loaded.model == model
    if external:  # the large initializers, nested ones too, went to the data file
        assert (tmp_path / "m.onnx").stat().st_size < 20_000


def test_chunks_are_one_valid_protobuf():
    model = _model()
    parsed = ModelProto()
    parsed.ParseFromString(b"".join(model_chunks(model)))
    assert parsed == model
    assert [n.op_type for n in parsed.graph.node] == [n.op_type for n in model.graph.node]


def test_rewrite_leaves_the_callers_model_unchanged_and_saves_round_trip(tmp_path):
    model = conv_model((1, 8, 9, 9), RNG.standard_normal((16, 8, 3, 3)).astype(np.float32),
                       RNG.standard_normal(16).astype(np.float32), pads=[1, 1, 1, 1])
    before = model.SerializeToString()
    rewritten, report = rewrite_model(model)
    assert model.SerializeToString() == before and report.rewritten
    assert "W" not in {t.name for t in rewritten.graph.initializer}
    save_model(rewritten, tmp_path / "r.onnx")
    assert read_model(tmp_path / "r.onnx").model == rewritten


def test_constant_pool_finds_identical_arrays_bit_for_bit():
    graph = GraphProto()
    pool = ConstantPool(NameScope(), graph)
    a = RNG.standard_normal((6, 5)).astype(np.float32)
    first = pool.add("a", a)
    assert pool.add("again", np.ascontiguousarray(a.T).T) == first  # a view of a copy
    assert pool.add("other", a + 1) != first
    assert pool.add("neg_zero", np.array([-0.0])) != pool.add("zero", np.array([0.0]))
    assert pool.add("int", a.astype(np.int32)) != first
    assert len(graph.initializer) == 5
    np.testing.assert_array_equal(numpy_helper.to_array(graph.initializer[0]), a)


def test_save_turns_to_external_data_when_the_stream_passes_the_limit(tmp_path, monkeypatch):
    """The initializers alone fit the limit, the whole model does not: the inline attempt
    stops part-way, leaves nothing behind, and the model goes out with external data."""
    model = _model()
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 12_000)  # "big" is 8 KiB, the model ~25 KiB
    save_model(model, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    loaded = read_model(tmp_path / "m.onnx")
    assert loaded.external_data and loaded.model == model


def test_constant_pool_confirms_a_sampled_match_byte_for_byte():
    graph = GraphProto()
    pool = ConstantPool(NameScope(), graph)
    big = RNG.standard_normal((100, 100)).astype(np.float32)  # hashed every 2nd element
    first = pool.add("big", big)
    unsampled = big.copy()
    unsampled.flat[1] += 1.0  # outside the sample: same key, other bytes
    assert pool.add("unsampled", unsampled) != first
    assert pool.add("same", np.ascontiguousarray(big.T).T) == first
    assert len(graph.initializer) == 2
