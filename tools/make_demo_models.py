"""Build the small demo models shipped in ``models/`` (reproducible: fixed seed, onnx.helper only).

``demo_cnn.onnx`` is a 1x3x32x32 classifier (batch dim symbolic ``N``) whose convs cover the
shapes the lowerings must handle: 3x3 strided, 1x1, grouped, depthwise, depthwise with a
channel multiplier, ``auto_pad=SAME_UPPER``, a residual Add, and a classifier that is a conv
over a 1x1 map (global average pool, 1x1 conv, Flatten), which the ``fc`` lowering can take.

Usage::

    python tools/make_demo_models.py            # writes models/demo_cnn.onnx
    python tools/make_demo_models.py --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 0
OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime the project supports
CLASSES = 10


class _Builder:
    """Appends nodes and He-initialised initializers, tracking channel counts."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.channels = {"input": 3}

    def conv(self, name: str, src: str, out_ch: int, k: int, stride: int = 1, group: int = 1,
             **attrs) -> str:
        in_per_group = self.channels[src] // group
        fan_in = in_per_group * k * k
        w = self.rng.standard_normal((out_ch, in_per_group, k, k)) * np.sqrt(2 / fan_in)
        b = self.rng.standard_normal(out_ch) * 0.1
        self.inits += [numpy_helper.from_array(w.astype(np.float32), f"{name}/W"),
                       numpy_helper.from_array(b.astype(np.float32), f"{name}/B")]
        return self.op("Conv", [src, f"{name}/W", f"{name}/B"], name, out_ch, kernel_shape=[k, k],
                       strides=[stride, stride], group=group, **attrs)

    def op(self, op_type: str, inputs: list[str], name: str, out_ch: int | None = None,
           **attrs) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        self.channels[out] = out_ch if out_ch is not None else self.channels[inputs[0]]
        return out


def build_demo_cnn(seed: int = SEED) -> onnx.ModelProto:
    """The demo CNN with weights drawn from ``seed``."""
    b = _Builder(np.random.default_rng(seed))
    pad1 = {"pads": [1, 1, 1, 1]}
    x = b.op("Relu", [b.conv("stem/conv", "input", 16, 3, stride=2, **pad1)], "stem/relu")  # 16x16
    x = b.op("Relu", [b.conv("block1/expand", x, 32, 1)], "block1/expand_relu")
    x = b.op("Relu", [b.conv("block1/grouped", x, 32, 3, group=4, **pad1)], "block1/grouped_relu")
    a = b.op("Relu", [b.conv("block2/depthwise", x, 32, 3, stride=2, group=32, **pad1)],
             "block2/depthwise_relu")  # 8x8
    x = b.op("Add", [b.conv("block2/project", a, 32, 1), a], "block2/residual")
    x = b.op("Relu", [x], "block2/relu")
    x = b.op("Relu", [b.conv("block3/depthwise_x2", x, 64, 3, stride=2, group=32,
                             auto_pad="SAME_UPPER")], "block3/depthwise_x2_relu")  # 4x4
    x = b.op("Relu", [b.conv("block3/pointwise", x, 64, 1)], "block3/pointwise_relu")
    x = b.op("GlobalAveragePool", [x], "head/pool")  # 1x1: the classifier conv is an FC layer
    x = b.conv("head/classifier", x, CLASSES, 1)
    b.nodes.append(helper.make_node("Flatten", [x], ["logits"], name="head/flatten", axis=1))

    graph = helper.make_graph(
        b.nodes, "demo_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        b.inits, doc_string="Small CNN covering the conv shapes onnx-convfc lowers.")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnx-convfc tools/make_demo_models.py",
                              producer_version="1", model_version=1,
                              doc_string=f"onnx-convfc demo CNN, random weights (seed {seed}).")
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"source": "tools/make_demo_models.py", "seed": str(seed)})
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "models",
                        help="folder to write into (default: models/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "demo_cnn.onnx"
    path.write_bytes(build_demo_cnn().SerializeToString())
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
