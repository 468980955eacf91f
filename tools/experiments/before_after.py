"""Latency of one lowering change on whole models: original, rewritten before, rewritten after.

The three models run interleaved in one process (``onnx_convfc.bench``), so the before/after
ratios share the machine's noise. "Before" is the package at a baseline exported to a folder:

  mkdir /tmp/convfc_old && git archive HEAD onnx_convfc | tar -x -C /tmp/convfc_old
  python tools/experiments/before_after.py --baseline /tmp/convfc_old models/demo_cnn.onnx \\
      --light resnet50 --input-shape x:1x3x640x640 /tmp/benchm/ch_PP-OCRv4_det_infer.onnx

Single convs: ``--conv 64,64,3,56,1`` (C, M, kernel, size, stride[, group]; pad k//2, one
image, random weights) adds a one-Conv model per flag.

Each rewritten output is checked against the original (max abs error) before timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_convfc import RewriteOptions, rewrite_model
from onnx_convfc.bench import (
    DEFAULT_THREADS,
    LIGHT_MODELS,
    compare_models,
    make_session,
    parse_threads,
)
from onnx_convfc.inputs import plan_feeds
from onnx_convfc.options import parse_input_shape

BASELINE_CHILD = """
import sys, onnx
from onnx_convfc import RewriteOptions, rewrite_model
shapes = tuple((n, tuple(int(d) for d in s.split("x")))
               for n, s in (a.rsplit(":", 1) for a in sys.argv[4:]))
model, _ = rewrite_model(onnx.load(sys.argv[1]), RewriteOptions(method=sys.argv[3],
                                                                   input_shapes=shapes))
onnx.save(model, sys.argv[2])
"""


def conv_file(text: str, folder: Path) -> Path:
    """A one-Conv model from ``C,M,K,SIZE,STRIDE[,GROUP]``, saved in ``folder``."""
    c, m, k, size, stride, group = ([int(v) for v in text.split(",")] + [1])[:6]
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((m, c // group, k, k)) / np.sqrt(c // group * k * k))
    inits = [numpy_helper.from_array(w.astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "B")]
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", group=group,
                            strides=[stride] * 2, pads=[k // 2] * 4)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, c, size, size])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], inits)
    path = folder / f"conv_{text.replace(',', '_')}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def rewrite_baseline(path: Path, out: Path, baseline: Path, method: str,
                     shapes: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(baseline))
    subprocess.run([sys.executable, "-c", BASELINE_CHILD, str(path.resolve()), str(out),
                    method, *shapes], env=env, check=True, cwd=baseline)


def max_error(a: onnx.ModelProto | str, b: onnx.ModelProto | str, feeds: dict) -> float:
    outs = [make_session(m, 1).run(None, feeds)[0] for m in (a, b)]
    return float(np.abs(outs[0].astype(np.float64) - outs[1]).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--light", nargs="+", default=[], metavar="NAME")
    parser.add_argument("--conv", action="append", default=[], metavar="C,M,K,SIZE,STRIDE[,G]")
    parser.add_argument("--baseline", type=Path, required=True,
                        help="folder holding the baseline onnx_convfc package")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--input-shape", dest="input_shapes", action="append", default=[],
                        metavar="NAME:DxD..")
    parser.add_argument("--threads", type=parse_threads, default=(DEFAULT_THREADS, 1))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory()
    paths = list(args.models) + [LIGHT_MODELS / f"light_{name}.onnx" for name in args.light]
    paths += [conv_file(text, Path(scratch.name)) for text in args.conv]
    summary: dict[int, list[tuple[float, float]]] = {}
    for path in paths:
        model = onnx.load(str(path))
        names = {i.name for i in model.graph.input}
        given = [s for s in args.input_shapes if s.rsplit(":", 1)[0] in names]
        shapes = tuple(parse_input_shape(s) for s in given)
        feeds = plan_feeds(model, input_shapes=shapes).feeds()
        with tempfile.TemporaryDirectory() as folder:
            before = Path(folder) / "before.onnx"
            rewrite_baseline(path, before, args.baseline, args.method, given)
            after, _ = rewrite_model(model, RewriteOptions(method=args.method,
                                                           input_shapes=shapes))
            print(f"\n{path.name}: max abs error vs original: before "
                  f"{max_error(str(path), str(before), feeds):.2e}, after "
                  f"{max_error(str(path), after, feeds):.2e}")
            results = compare_models({"original": str(path), "before": str(before),
                                      "after": after}, feeds, threads=args.threads,
                                     repeats=args.repeats)
        for threads, timings in results.items():
            by = {t.label: t for t in timings}
            label = "default" if threads == DEFAULT_THREADS else threads
            print(f"  threads={label}: original {by['original'].median_ms:.2f} ms, "
                  f"before {by['before'].ratio:.3f}x, after {by['after'].ratio:.3f}x")
            summary.setdefault(threads, []).append((by["before"].ratio, by["after"].ratio))
    for threads, pairs in summary.items():
        label = "default" if threads == DEFAULT_THREADS else threads
        before, after = (statistics.geometric_mean(p[i] for p in pairs) for i in (0, 1))
        print(f"\ngeometric mean, threads={label}: before {before:.3f}x, after {after:.3f}x "
              f"over {len(pairs)} models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
