"""Rewrite, then quantize the lowered convs to int4 with onnxruntime's MatMulNBitsQuantizer.

    python examples/02_int4_quantize.py [MODEL] [OUTPUT]

The quantizer takes only MatMul nodes whose B is a 2-D constant, which is what the rewrite
emits; ``split_groups=True`` gives grouped and depthwise convs one 2-D MatMul per group so
they are quantized too. Needs ``onnx-ir`` (onnxruntime's quantizer imports it).
"""

import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

import onnx_convfc

logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]
source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models" / "demo_cnn.onnx"
target = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(source.stem + ".int4.onnx")

model, report = onnx_convfc.rewrite_model(source, split_groups=True)
print(report.summary())

# Graph simplifiers that fuse MatMul+Add into Gemm (onnxslim, onnxsim) belong before the
# rewrite: run after it, they hide the weights from this quantizer again.
quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32)
quantizer.process()
quantized = quantizer.model.model
ops = [n.op_type for n in quantized.graph.node]
print(f"{ops.count('MatMulNBits')} MatMulNBits (int4), {ops.count('MatMul')} MatMul left in float")

original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
int4 = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
         .astype(np.float32) for i in original.get_inputs()}
a, b = (s.run(None, feeds)[0].ravel() for s in (original, int4))
cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
print(f"cosine similarity of int4 vs float outputs: {cosine:.4f}")

onnx.save(quantized, target)
print(f"wrote {target}")
