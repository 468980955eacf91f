"""Lower convs as one step of an onnx-graphsurgeon pipeline.

    python examples/03_graphsurgeon_step.py [MODEL] [OUTPUT]

``lower_convs(graph)`` rewrites the graph you hold in place; ``register_graph_method()`` is
an opt-in that also makes it a ``gs.Graph`` method. Nodes and tensors are new objects after
the call (names are kept), so look tensors up again by name.
"""

import sys
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

import onnx_convfc
from onnx_convfc.graphsurgeon import lower_convs, register_graph_method

ROOT = Path(__file__).resolve().parents[1]
source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models" / "demo_cnn.onnx"
target = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(source.stem + ".gs.onnx")

graph = gs.import_onnx(onnx.load(source))
graph.fold_constants()                      # an earlier step of the pipeline
report = lower_convs(graph, method="auto")  # the plain function: the graph changes in place
print(report.summary())
graph.cleanup().toposort()                  # graphsurgeon carries on with the same object

register_graph_method()                     # opt in once: every gs.Graph gets .lower_convs()
other = gs.import_onnx(onnx.load(source))
print(other.lower_convs(split_groups=True).summary())

model = gs.export_onnx(graph)
parity = onnx_convfc.check_parity(source, model)
print(parity.summary())
if not parity.passed:
    raise SystemExit(1)
onnx.save(model, target)
print(f"wrote {target}")
