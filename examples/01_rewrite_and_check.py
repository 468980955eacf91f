"""Rewrite a model's convs into MatMul form from Python, prove parity, save it.

    python examples/01_rewrite_and_check.py [MODEL] [OUTPUT]

MODEL defaults to models/demo_cnn.onnx, OUTPUT to demo_cnn.convfc.onnx in the current folder.
"""

import sys
from pathlib import Path

import onnx_convfc

ROOT = Path(__file__).resolve().parents[1]
source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models" / "demo_cnn.onnx"
target = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(source.stem + ".convfc.onnx")

# A path or a ModelProto in, a new ModelProto and a report out; no file is written yet.
model, report = onnx_convfc.rewrite_model(source, method="auto")
for row in report.rows:
    print(f"  {row.node:24} {row.geometry:28} {row.lowering or 'skipped: ' + row.reason}")
print(report.summary())

# Same seeded inputs through both models in onnxruntime, every output compared.
parity = onnx_convfc.check_parity(source, model, providers="cpu")
print(parity.summary())
if not parity.passed:
    raise SystemExit(1)

onnx_convfc.save_model(model, target)
print(f"wrote {target}")
