"""Quantizer-ready output: onnxruntime's quantizers reach the lowered convs.

- int4 weight-only (``MatMulNBitsQuantizer``) takes only ``MatMul`` with a 2-D constant B:
  group-1 convs always qualify; grouped and depthwise convs only with ``split_groups``.
- int8 dynamic (``quantize_dynamic``) turns the lowered MatMuls into ``MatMulInteger``.
- Graph simplifiers that fuse MatMul+Add into Gemm must run before the rewrite (or skip that
  fusion), or the weights are hidden from MatMul-only quantizers again.

Real-model cases use onnx's bundled light models with seeded random weights (their own
weights are one constant) and compare the logits, not the saturated softmax.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from convmodels import conv_model, random_conv, run
from onnx import ModelProto, numpy_helper

import onnx_convfc

nbits = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer",
                            reason="MatMulNBitsQuantizer needs onnx-ir (pip install onnx-ir)")
from onnxruntime.quantization import quantize_dynamic  # noqa: E402

logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo_cnn.onnx"
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
BLOCK_SIZES = (32, 64, 128)


# ---------------------------------------------------------------- helpers

def quantize_int4(model: ModelProto, block_size: int) -> ModelProto:
    """onnxruntime's default int4 weight-only quantization (it edits its input: pass a copy)."""
    copy = ModelProto()
    copy.CopyFrom(model)
    quantizer = nbits.MatMulNBitsQuantizer(copy, bits=4, block_size=block_size)
    quantizer.process()
    return quantizer.model.model


def int4_share(original: ModelProto, rewritten: ModelProto,
               quantized: ModelProto) -> tuple[float, list[str]]:
    """Share of the original conv weight bytes now held by MatMulNBits, and the convs left out.

    A conv counts by the part of its lowered weight bytes whose MatMul became MatMulNBits
    (identified by the MatMul's output, which the quantizer keeps).
    """
    weights = {t.name: t for t in original.graph.initializer}
    lowered = {t.name: numpy_helper.to_array(t).nbytes for t in rewritten.graph.initializer}
    in_nbits = {o for n in quantized.graph.node if n.op_type == "MatMulNBits" for o in n.output}
    total = taken = 0.0
    left_out = []
    for conv in (n for n in original.graph.node if n.op_type == "Conv"):
        name = conv.name or conv.output[0]
        conv_bytes = numpy_helper.to_array(weights[conv.input[1]]).nbytes
        matmuls = [n for n in rewritten.graph.node
                   if n.op_type == "MatMul" and n.name.startswith(f"{name}/convfc/")]
        size = sum(lowered[m.input[1]] for m in matmuls)
        done = sum(lowered[m.input[1]] for m in matmuls if m.output[0] in in_nbits)
        total += conv_bytes
        taken += conv_bytes * (done / size if size else 0.0)
        if done < size or not size:
            left_out.append(name)
    return taken / total, left_out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def random_feeds(model: ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def op_types(model: ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def demo_model() -> ModelProto:
    if not DEMO.exists():
        pytest.skip(f"{DEMO} missing: run python tools/make_demo_models.py")
    return onnx.load(DEMO)


def light_model(name: str, seed: int = 0) -> ModelProto:
    """A bundled light model with seeded random weights, its softmax removed.

    Its ``ConstantOfShape`` weights become initializers: He-scaled normal conv weights,
    BatchNorm scales and variances in [0.5, 1.5], small normal values for the rest.
    """
    model = onnx.load(LIGHT / f"{name}.onnx")
    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    role = {name: (n.op_type, i) for n in model.graph.node for i, name in enumerate(n.input)}
    nodes, weights = [], []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            nodes.append(node)
            continue
        shape = shapes[node.input[0]].tolist()
        op, index = role[node.output[0]]
        if (op, index) == ("Conv", 1):
            value = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
        elif op == "BatchNormalization" and index in (1, 4):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.standard_normal(shape) * 0.1
        weights.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
    if nodes[-1].op_type == "Softmax":
        model.graph.output[0].name = nodes.pop().input[0]
    used = {i for n in nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used] + weights
    constant = {t.name for t in kept}
    inputs = [v for v in model.graph.input if v.name in used and v.name not in constant]
    for holder, items in ((model.graph.node, nodes), (model.graph.initializer, kept),
                          (model.graph.input, inputs)):
        del holder[:]
        holder.extend(items)
    model.ir_version = 7  # initializers need not be graph inputs any more
    return model


def grouped_conv_names(model: ModelProto) -> set[str]:
    return {n.name for n in model.graph.node if n.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in n.attribute)}


# ---------------------------------------------------------------- split groups: parity

SPLIT_CASES = {
    # name: (x shape, out channels, kernel, group, conv attributes, declared dims)
    "depthwise_3x3": ((2, 8, 9, 9), 8, (3, 3), 8, dict(pads=[1, 1, 1, 1]), None),
    "depthwise_x2_same_dynamic": ((1, 4, 10, 11), 8, (3, 3), 4,
                                  dict(strides=[2, 2], auto_pad="SAME_UPPER"),
                                  ["N", 4, "H", "W"]),
    "grouped_dilated_no_bias": ((1, 6, 12, 12), 4, (3, 3), 2,
                                dict(dilations=[2, 2], pads=[0, 1, 2, 1]), None),
    "grouped_pointwise_strided": ((2, 8, 7, 7), 8, (1, 1), 4, dict(strides=[2, 2]), None),
    "depthwise_1d": ((2, 6, 20), 6, (5,), 6, dict(pads=[2, 2]), None),
    "grouped_3d": ((1, 4, 5, 6, 7), 4, (3, 3, 3), 2, dict(pads=[1] * 6), None),
    "group_1_unchanged": ((1, 3, 8, 8), 4, (3, 3), 1, dict(pads=[1, 1, 1, 1]), None),
}


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_groups_gives_one_2d_matmul_per_group(case, close):
    x_shape, m, kernel, group, attrs, dims = SPLIT_CASES[case]
    rng = np.random.default_rng(7)
    w, b = random_conv(rng, x_shape[1], m, kernel, group, bias=case != "grouped_dilated_no_bias")
    model = conv_model(x_shape, w, b, dims=dims, group=group, **attrs)
    rewritten, report = onnx_convfc.rewrite_model(model, split_groups=True)
    assert report.rewritten, report.rows[0].reason

    inits = {t.name: t for t in rewritten.graph.initializer}
    shapes = [tuple(inits[n.input[1]].dims) for n in rewritten.graph.node
              if n.op_type == "MatMul"]
    taps = int(np.prod(kernel))
    assert shapes == [(taps * x_shape[1] // group, m // group)] * group

    x = rng.standard_normal(x_shape).astype(np.float32)
    close(run(rewritten, {"X": x})[0], run(model, {"X": x})[0], 1e-5, case)


def test_without_split_groups_a_grouped_conv_has_one_batched_matmul():
    w, b = random_conv(np.random.default_rng(0), 8, 8, (3, 3), group=4)
    rewritten, _ = onnx_convfc.rewrite_model(conv_model((1, 8, 6, 6), w, b, group=4))
    inits = {t.name: t for t in rewritten.graph.initializer}
    shapes = [tuple(inits[n.input[1]].dims) for n in rewritten.graph.node
              if n.op_type == "MatMul"]
    assert shapes == [(4, 18, 2)]


# ---------------------------------------------------------------- int4 MatMulNBits

@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_int4_takes_every_demo_conv_with_split_groups(block_size):
    model = demo_model()
    rewritten, _ = onnx_convfc.rewrite_model(model, split_groups=True)
    quantized = quantize_int4(rewritten, block_size)
    share, left_out = int4_share(model, rewritten, quantized)
    assert share >= 0.95 and not left_out, (share, left_out)
    assert "MatMul" not in op_types(quantized)

    feeds = random_feeds(model)
    similarity = cosine(run(quantized, feeds)[0], run(model, feeds)[0])
    assert similarity > 0.95, f"cosine {similarity:.4f} of int4 logits vs float original"


def test_int4_without_split_groups_takes_the_group_1_convs():
    model = demo_model()
    rewritten, _ = onnx_convfc.rewrite_model(model)
    share, left_out = int4_share(model, rewritten, quantize_int4(rewritten, 32))
    assert set(left_out) <= grouped_conv_names(model), left_out
    assert 0 < share < 1


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_int4_on_a_real_model(block_size):
    model = light_model("light_squeezenet")
    rewritten, report = onnx_convfc.rewrite_model(model)
    assert len(report.rewritten) == len(report.rows) == 26
    quantized = quantize_int4(rewritten, block_size)
    share, left_out = int4_share(model, rewritten, quantized)
    assert share >= 0.95 and not left_out, (share, left_out)

    feeds = random_feeds(model)
    similarity = cosine(run(quantized, feeds)[0], run(model, feeds)[0])
    assert similarity > 0.95, f"cosine {similarity:.4f} of int4 logits vs float original"


def test_int4_on_a_real_model_with_depthwise_convs():
    model = light_model("light_shufflenet")
    assert len(grouped_conv_names(model)) == 48
    rewritten, _ = onnx_convfc.rewrite_model(model, split_groups=True)
    quantized = quantize_int4(rewritten, 128)
    share, left_out = int4_share(model, rewritten, quantized)
    assert share >= 0.95 and not left_out, (share, left_out)

    feeds = random_feeds(model)
    similarity = cosine(run(quantized, feeds)[0], run(model, feeds)[0])
    assert similarity > 0.95, f"cosine {similarity:.4f} of int4 logits vs float original"


# ---------------------------------------------------------------- int8 dynamic

@pytest.mark.parametrize("source", ["demo", "light_squeezenet"])
def test_int8_dynamic_gives_matmulinteger_that_runs(source, tmp_path):
    model = demo_model() if source == "demo" else light_model(source)
    rewritten, _ = onnx_convfc.rewrite_model(model)
    feeds = random_feeds(model)
    reference = run(model, feeds)[0]

    def int8(m: ModelProto, stem: str) -> ModelProto:
        onnx.save(m, tmp_path / f"{stem}.onnx")
        quantize_dynamic(tmp_path / f"{stem}.onnx", tmp_path / f"{stem}.int8.onnx")
        return onnx.load(tmp_path / f"{stem}.int8.onnx")

    quantized = int8(rewritten, "rewritten")
    assert "MatMulInteger" in op_types(quantized)
    assert not op_types(quantized) & {"ConvInteger", "Conv", "MatMul"}
    similarity = cosine(run(quantized, feeds)[0], reference)
    assert similarity > 0.999, f"cosine {similarity:.5f} of int8 output vs float original"
    assert "ConvInteger" in op_types(int8(model, "original"))  # what the original becomes


# ---------------------------------------------------------------- graph tools

def test_gemm_fusion_must_come_before_the_rewrite():
    """onnxslim's MatMul+Add->Gemm fusion hides the weights from MatMul-only quantizers."""
    onnxslim = pytest.importorskip("onnxslim")
    model = light_model("light_squeezenet")

    def int4_share_after(original: ModelProto, rewritten: ModelProto) -> float:
        return int4_share(original, rewritten, quantize_int4(rewritten, 128))[0]

    rewritten, _ = onnx_convfc.rewrite_model(model)
    fused = onnxslim.slim(rewritten)
    assert "Gemm" in op_types(fused) and int4_share_after(model, fused) == 0

    slimmed = onnxslim.slim(model)
    slim_first, _ = onnx_convfc.rewrite_model(slimmed)
    assert "Gemm" not in op_types(slim_first) and int4_share_after(slimmed, slim_first) == 1
    no_gemm = onnxslim.slim(rewritten, skip_fusion_patterns=["FusionGemm"])
    assert "Gemm" not in op_types(no_gemm) and int4_share_after(model, no_gemm) == 1
