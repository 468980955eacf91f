"""Rewrite every real model with ``--method auto``, check parity, print one row per model.

Models: the ONNX Model Zoo classics bundled in the ``onnx`` package (``light_*``: as shipped,
whose ``ConstantOfShape`` weights make every output nearly uniform, and with those weights
replaced by seeded random ones, so parity means something), and the PyPI-wheel models that
``tools/fetch_zoo.py`` put in the cache (a line says so when the cache is empty).

Per model: convs rewritten / conv-like nodes in the model, parity of every output (and of
every main-graph conv's output) on onnxruntime CPU with the inputs each model needs, the
onnxruntime latency ratio rewritten/original (interleaved runs, median), and the rewrite time.
Parity holds when onnxruntime's outputs pass ``parity.check_parity``'s element rule and every
output and conv output is within ``SCALE_LIMITS`` of its scale. Relative errors are to the
tensor's largest magnitude; with random weights some classics end in a saturated softmax, so
their per-conv column is the telling one.

usage: python tools/zoo_parity.py [--cache DIR] [--only GLOB] [--runs N] [--repeats N]
                                  [--no-bench] [--json FILE]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_zoo import cache_dir, wheel_folder  # noqa: E402

from onnx_convfc import rewrite_model  # noqa: E402
from onnx_convfc.bench import bench_models  # noqa: E402
from onnx_convfc.families import is_conv  # noqa: E402
from onnx_convfc.graphs import all_nodes  # noqa: E402
from onnx_convfc.io import first_line, load_model  # noqa: E402
from onnx_convfc.parity import check_parity  # noqa: E402

ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
CLASSICS = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
            "shufflenet", "squeezenet", "vgg19", "zfnet512")
# Parity target of the issue: max |error| <= LIMIT * max(1, max |reference|), per tensor.
SCALE_LIMITS = {"float64": 1e-8, "float32": 1e-4, "float16": 1e-2}
SILERO_16K = ((("input", (1, 512)), ("state", (2, 1, 128))), (("sr", ("16000",)),))


@dataclass(frozen=True)
class ZooModel:
    """One model to check: where it is and the inputs it needs."""

    name: str
    wheel: str | None  # ``package==version`` of fetch_zoo.WHEELS; None: bundled with onnx
    path: str  # inside the wheel, or absolute for bundled models
    input_shapes: tuple = ()
    input_values: tuple = ()
    random_weights: bool = False
    in_zoo_md: bool = True  # listed in ZOO.md (the others are extra models of the same wheels)

    def file(self, cache: Path) -> Path:
        return Path(self.path) if self.wheel is None else \
            wheel_folder(cache, self.wheel) / self.path


RAPIDOCR, SILERO, QONNX = "rapidocr_onnxruntime==1.4.4", "silero-vad==6.2.3", "qonnx==1.0.0"
OCR = "rapidocr_onnxruntime/models/"
VAD = "silero_vad/data/"
QDATA = "qonnx/data/onnx/"
WHEEL_MODELS = (
    ZooModel("PP-OCRv4 det", RAPIDOCR, OCR + "ch_PP-OCRv4_det_infer.onnx",
             (("x", (1, 3, 640, 640)),)),
    ZooModel("PP-OCRv4 rec", RAPIDOCR, OCR + "ch_PP-OCRv4_rec_infer.onnx",
             (("x", (1, 3, 48, 320)),)),
    ZooModel("PP-OCR mobile v2 cls", RAPIDOCR, OCR + "ch_ppocr_mobile_v2.0_cls_infer.onnx",
             (("x", (1, 3, 48, 192)),)),
    ZooModel("silero-vad (If)", SILERO, VAD + "silero_vad.onnx", *SILERO_16K),
    ZooModel("silero-vad op18 ifless", SILERO, VAD + "silero_vad_op18_ifless.onnx", *SILERO_16K),
    ZooModel("MNIST CNN (qonnx)", QONNX, QDATA + "mnist-conv/model.onnx"),
    ZooModel("silero-vad 16k op15", SILERO, VAD + "silero_vad_16k_op15.onnx", *SILERO_16K,
             in_zoo_md=False),
    ZooModel("silero-vad half", SILERO, VAD + "silero_vad_half.onnx", SILERO_16K[0],
             in_zoo_md=False),
    ZooModel("silero-vad 16k sequence", SILERO, VAD + "silero_vad_16k_sequence.onnx",
             (("input", (4, 576)),), in_zoo_md=False),
    ZooModel("silero-vad openvino 16k", SILERO, VAD + "silero_vad_openvino_16k.onnx",
             in_zoo_md=False),
    ZooModel("ESPCN nn_resize (qonnx)", QONNX, QDATA + "bsd300x3-espcn/nn_resize/float_model.onnx",
             in_zoo_md=False),
    ZooModel("ESPCN subpixel (qonnx)", QONNX, QDATA + "bsd300x3-espcn/subpixel/float_model.onnx",
             in_zoo_md=False),
    ZooModel("residual block (qonnx)", QONNX, QDATA + "residual_block_clean.onnx",
             in_zoo_md=False),
)


def classic_models() -> list[ZooModel]:
    """The bundled ``light_*`` classics, each as shipped and with random weights."""
    models = []
    for name in CLASSICS:
        path = str(ONNX_DATA / "light" / f"light_{name}.onnx")
        models.append(ZooModel(f"{name} (bundled weights)", None, path))
        models.append(ZooModel(f"{name} (random weights)", None, path, random_weights=True))
    return models


def all_models() -> list[ZooModel]:
    return [*classic_models(), *WHEEL_MODELS]


def with_random_weights(model: ModelProto, seed: int = 0) -> ModelProto:
    """A copy whose ``ConstantOfShape``-filled float tensors are seeded random initializers.

    Weights (rank >= 2) get He-scaled normal values, so activations keep their scale through
    the network; rank-0/1 tensors (biases, batch-norm statistics) get values in [0.5, 1.5],
    positive so that variances stay valid.
    """
    copy = ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    rng = np.random.default_rng(seed)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    replaced = []
    for index, node in enumerate(graph.node):
        if node.op_type != "ConstantOfShape" or node.input[0] not in consts:
            continue
        fill = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"),
                    np.zeros(1, np.float32))
        if fill.dtype.kind != "f":
            continue
        shape = tuple(int(d) for d in consts[node.input[0]])
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            values = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        else:
            values = rng.uniform(0.5, 1.5, shape)
        graph.initializer.append(numpy_helper.from_array(values.astype(fill.dtype),
                                                         node.output[0]))
        replaced.append(index)
    for index in reversed(replaced):
        del graph.node[index]
    _drop_unread_initializers(graph)
    return copy


def _drop_unread_initializers(graph: GraphProto) -> None:
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = {t.name for t in graph.initializer if t.name not in read}
    for index in reversed([k for k, t in enumerate(graph.initializer) if t.name in dead]):
        del graph.initializer[index]
    for index in reversed([k for k, v in enumerate(graph.input) if v.name in dead]):
        del graph.input[index]


def conv_nodes(model: ModelProto) -> Counter:
    """Conv-like nodes by op type, in every graph, subgraph and local function."""
    return Counter(n.op_type for n in all_nodes(model) if is_conv(n))


@dataclass
class Row:
    """What one model gave."""

    model: str
    rewritten: int = 0
    total: int = 0
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    worst_conv_rel: float = float("nan")
    parity: str = "-"
    latency_ratio: float = float("nan")
    rewrite_seconds: float = float("nan")
    not_rewritten: list[str] = field(default_factory=list)
    uncovered_ops: list[str] = field(default_factory=list)  # op types left in the model
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None and self.parity == "ok"


def load(entry: ZooModel, cache: Path) -> ModelProto:
    model = load_model(entry.file(cache))
    return with_random_weights(model) if entry.random_weights else model


def within_scale(comparison) -> bool:
    """The issue's rule: max |error| <= limit * max(1, max |reference|) for its dtype."""
    stats = comparison.stats
    if stats is None:
        return False
    limit = SCALE_LIMITS.get(comparison.dtype, 0.0)
    return stats.max_abs <= limit * max(1.0, stats.scale)


def check_model(entry: ZooModel, cache: Path, *, runs: int = 1, repeats: int = 10,
                bench: bool = True) -> Row:
    """Rewrite one model, check parity (outputs and per conv) and time both."""
    row = Row(entry.name)
    try:
        original = load(entry, cache)
        started = time.perf_counter()
        rewritten, report = rewrite_model(original, method="auto",
                                          input_shapes=entry.input_shapes)
        row.rewrite_seconds = time.perf_counter() - started
    except Exception as err:  # noqa: BLE001 - one bad model must not stop the table
        row.problem = f"rewrite failed: {first_line(err)}"
        return row
    in_model = conv_nodes(original)
    row.total = sum(in_model.values())
    row.rewritten = len(report.rewritten)
    row.not_rewritten = [f"{r.op_type} '{r.node}': {r.reason}" for r in report.skipped]
    reported = Counter(r.op_type for r in report.rows)
    row.not_rewritten += [f"{n} {op}: no lowering handles {op} yet"
                          for op, n in (in_model - reported).items()]
    row.uncovered_ops = sorted({r.op_type for r in report.skipped} |
                               set(in_model - reported))
    inputs = dict(input_shapes=entry.input_shapes, input_values=entry.input_values)
    try:
        parity = check_parity(original, rewritten, runs=runs, per_node=True, **inputs)
    except Exception as err:  # noqa: BLE001
        row.problem = f"parity check failed to run: {first_line(err)}"
        return row
    stats = [c.stats for c in parity.outputs if c.stats is not None]
    row.max_abs = max((s.max_abs for s in stats), default=float("nan"))
    row.max_rel = max((s.max_rel for s in stats), default=float("nan"))
    row.worst_conv_rel = max((c.stats.max_rel for c in parity.nodes if c.stats is not None),
                             default=float("nan"))
    outside = [c for c in parity.outputs + parity.nodes if not within_scale(c)]
    row.parity = "ok" if parity.passed and not outside else "FAILED"
    row.not_rewritten += parity.errors
    row.not_rewritten += [f"{c.node or c.tensor}: {c.verdict()}" for c in outside[:3]]
    if bench:
        timing = bench_models(original, rewritten, threads=(0,), repeats=repeats, warmup=2,
                              **inputs)
        row.latency_ratio = timing.rows[0].ratio
    return row


def format_table(rows: list[Row]) -> str:
    lines = ["| model | convs rewritten | max abs err | max rel err | worst conv rel err | "
             "parity | latency rewritten/original | rewrite s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.problem:
            lines.append(f"| {r.model} | - | - | - | - | {r.problem} | - | - |")
            continue
        lines.append(f"| {r.model} | {r.rewritten}/{r.total} | {r.max_abs:.1e} | "
                     f"{r.max_rel:.1e} | {_number(r.worst_conv_rel)} | {r.parity} | "
                     f"{_ratio(r.latency_ratio)} | {r.rewrite_seconds:.2f} |")
    return "\n".join(lines)


def _ratio(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.2f}x"


def _number(value: float) -> str:
    """``-`` where nothing was measured (every conv sits in a subgraph)."""
    return "-" if np.isnan(value) else f"{value:.1e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help="fetch_zoo cache (default: $ONNX_CONVFC_ZOO or "
                             "~/.cache/onnx-convfc/zoo)")
    parser.add_argument("--only", action="append", default=[], metavar="GLOB",
                        help="check only models whose name matches (repeatable)")
    parser.add_argument("--runs", type=int, default=1, help="parity runs per model")
    parser.add_argument("--repeats", type=int, default=10, help="latency rounds per model")
    parser.add_argument("--no-bench", action="store_true", help="skip the latency ratio")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    cache = args.cache or cache_dir()
    rows, missing = [], []
    for entry in all_models():
        if args.only and not any(fnmatch.fnmatchcase(entry.name, g) for g in args.only):
            continue
        if not entry.file(cache).is_file():
            missing.append(entry.name)
            continue
        row = check_model(entry, cache, runs=args.runs, repeats=args.repeats,
                          bench=not args.no_bench)
        rows.append(row)
        print(f"{row.model}: {row.problem or row.parity}", file=sys.stderr, flush=True)
    print(format_table(rows))
    for row in rows:
        for line in row.not_rewritten:
            print(f"  {row.model}: {line}")
    if missing:
        print(f"not in the cache {cache} (run python tools/fetch_zoo.py): {', '.join(missing)}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
