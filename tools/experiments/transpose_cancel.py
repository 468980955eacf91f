"""Does onnxruntime cancel the Transpose pairs of consecutive lowered convs? (issue 7, question 1)

Builds five 3x3 convs lowered with Transposes around each (as ``lowering/patches.py`` emits),
with an op between consecutive convs, lets onnxruntime optimise the graph
(``SessionOptions.optimized_model_filepath``) and counts what is left.

Run: python tools/experiments/transpose_cancel.py
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import onnx
from forms import boundary, nhwc_im2col_form
from layout import chain

from onnx_convfc.bench import make_session

BETWEEN = (("Relu", "Relu", False), ("Clip (Relu6)", "Clip", False),
           ("Mul + Add constants", "ScaleShift", False),
           ("BatchNormalization", "BatchNormalization", False),
           ("Relu + residual Add", "Relu", True))


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "optimized.onnx")
        for label, op, residual in BETWEEN:
            model = chain(boundary(nhwc_im2col_form), op, residual=residual)
            make_session(model, 1, optimized_path=path)
            ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
            before = sum(n.op_type == "Transpose" for n in model.graph.node)
            print(f"{label:<22} Transposes {before} -> {ops['Transpose']}; optimised graph: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))


if __name__ == "__main__":
    main()
