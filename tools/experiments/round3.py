"""Third round (docs/performance.md, section 11): whole-model variants of the rewrite, each
checked against the original, then timed next to it and the default rewrite (1 thread).

  python tools/experiments/round3.py pinned --input-shape x:1x3x640x640 det.onnx
  python tools/experiments/round3.py weight-left --method pointwise --light squeezenet cls.onnx
  python tools/experiments/round3.py no-depthwise models/demo_cnn.onnx rec.onnx
  python tools/experiments/round3.py rejected --light densenet121 cls.onnx

- pinned: a GEMM whose sizes only ``--input-shape`` fixes, with its bias Add fused and its
  rank declared (the default), fused without the rank, and not fused.
- weight-left: FC form, ``--weight-left`` over >= 28x28 pixels only (the rule before), and
  with its channel rule (the default of the flag), and everywhere.
- no-depthwise: ``--skip depthwise``, every other conv rewritten.
- rejected: what did not pay: the activation moved before the GEMM's Reshape (so that
  onnxruntime fuses it into a FusedGemm), every BatchNormalization as Mul + Add with
  channels-last Concats, one Sum instead of the shift-add's Add chain, the depthwise
  Gather form for small layers, channels-first depthwise.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from collections import defaultdict
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_convfc import RewriteOptions, rewrite_model
from onnx_convfc.batchnorm import as_affine
from onnx_convfc.bench import LIGHT_MODELS, compare_models, make_session
from onnx_convfc.emit import Emitter
from onnx_convfc.inputs import plan_feeds
from onnx_convfc.lowering import depthwise, patches, pointwise
from onnx_convfc.lowering.taps import tap_slices
from onnx_convfc.options import parse_input_shape
from onnx_convfc.profile import MARKER

ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid", "Tanh"}


def _hoist_activations(model: onnx.ModelProto) -> None:
    """Activation right after a lowered conv's 2-D bias Add, before its Reshape/Transpose."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers = defaultdict(int)
    for n in graph.node:
        for name in n.input:
            readers[name] += 1
    for act in [n for n in graph.node if n.op_type in ACTIVATIONS]:
        chain, node = [], producer.get(act.input[0])
        while node is not None and node.op_type in ("Transpose", "Reshape") \
                and MARKER in node.name and readers[node.output[0]] == 1:
            chain.append(node)
            node = producer.get(node.input[0])
        if not chain or node is None or "AddBias" not in node.name \
                or readers[node.output[0]] != 1:
            continue
        out = act.output[0]
        act.input[0], act.output[0] = node.output[0], act.name + "_hoisted"
        chain[-1].input[0], chain[0].output[0] = act.output[0], out
    _sort(graph)


def _affine_bns_and_channels_last_concats(model: onnx.ModelProto) -> None:
    """Every constant BatchNormalization as Mul + Add; a Concat on channels fed by a lowered
    conv's Transpose becomes a channels-last Concat and one Transpose."""
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = []
    for n in graph.node:
        bn = as_affine(n, inits.get, np.float32) if n.op_type == "BatchNormalization" else None
        if bn is None:
            nodes.append(n)
            continue
        for what, value in (("scale", bn.scale), ("shift", bn.shift)):
            graph.initializer.append(numpy_helper.from_array(
                value.astype(np.float32).reshape(-1, 1, 1), f"{n.name}/{what}"))
        nodes += [helper.make_node("Mul", [n.input[0], f"{n.name}/scale"], [f"{n.name}/m"]),
                  helper.make_node("Add", [f"{n.name}/m", f"{n.name}/shift"], [n.output[0]])]
    channels_last = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Transpose"
                     and list(n.attribute[0].ints) == [0, 3, 1, 2]}
    graph.ClearField("node")
    for n in nodes:
        if n.op_type != "Concat" or n.attribute[0].i != 1 \
                or not any(i in channels_last for i in n.input):
            graph.node.append(n)
            continue
        inputs = []
        for name in n.input:
            if name not in channels_last:
                graph.node.append(helper.make_node("Transpose", [name], [name + "/cl"],
                                                   perm=[0, 2, 3, 1]))
                channels_last[name] = name + "/cl"
            inputs.append(channels_last[name])
        joined = n.output[0] + "/cl"
        graph.node.extend([helper.make_node("Concat", inputs, [joined], axis=3),
                           helper.make_node("Transpose", [joined], [n.output[0]],
                                            perm=[0, 3, 1, 2])])
        channels_last[n.output[0]] = joined


def _sort(graph: onnx.GraphProto) -> None:
    known = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        for n in ready:
            known.update(n.output)
        ordered += ready
        pending = [n for n in pending if n not in ready]
    graph.ClearField("node")
    graph.node.extend(ordered)


def _sum_of_taps(spec, em: Emitter, x: str, first_axis: int, scales: list[str],
                 output: str | None, suffix: str) -> str:
    """Shift-add with one variadic Sum instead of the Add chain."""
    terms = [em.op("Mul", [piece, scale], f"scale_{k}{suffix}")
             for k, (piece, scale) in enumerate(zip(tap_slices(spec, em, x, first_axis, suffix),
                                                     scales))]
    return em.op("Sum", terms, f"sum{suffix}", output=output)


small_gather = depthwise.uses_gather
# name -> [(label, rewrite options, patches (module, attribute, value), post-process)]
VARIANTS: dict[str, list[tuple]] = {
    "pinned": [
        ("fused+rank", {}, [], None),
        ("fused, no rank", {}, [(Emitter, "declare", lambda *a: None)], None),
        ("not fused", {}, [(patches, "RUNTIME_SHAPE_BYTES", 1 << 60)], None),
    ],
    "weight-left": [
        ("FC form", {}, [], None),
        (">=28x28 only", {"weight_left": True}, [(pointwise, "WEIGHT_LEFT_CHANNELS", 0)], None),
        ("rule", {"weight_left": True}, [], None),
        ("everywhere", {"weight_left": True},
         [(pointwise, "WEIGHT_LEFT_CHANNELS", 1 << 30)], None),
    ],
    "no-depthwise": [
        ("auto", {}, [], None),
        ("--skip depthwise", {"skip": ("depthwise",)}, [], None),
    ],
    "rejected": [
        ("default", {}, [], None),
        ("activation hoisted", {}, [], _hoist_activations),
        ("BN affine, CL Concat", {}, [], _affine_bns_and_channels_last_concats),
        ("Sum of taps", {}, [(depthwise, "_shift_add", _sum_of_taps)], None),
        ("dw Gather < 256 KiB", {}, [(depthwise, "uses_gather", lambda s: small_gather(s) or (
            s.is_static and depthwise._output_elements(s) * 4 < 256 << 10))], None),
        ("dw channels-first", {}, [(depthwise, "uses_gather", lambda s: False),
                                   (depthwise, "_rows_shift_add_form",
                                    depthwise._shift_add_form)], None),
    ],
}


def rewritten(model: onnx.ModelProto, options: RewriteOptions, variant: tuple):
    _, overrides, patched, post = variant
    with contextlib.ExitStack() as stack:
        for module, name, value in patched:
            stack.enter_context(mock.patch.object(module, name, value))
        out, _ = rewrite_model(model, options.updated(**overrides))
    if post is not None:
        post(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("experiment", choices=sorted(VARIANTS))
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--light", nargs="+", default=[], metavar="NAME")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--input-shape", dest="input_shapes", action="append", default=[],
                        type=parse_input_shape, metavar="NAME:DxD..")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    for path in list(args.models) + [LIGHT_MODELS / f"light_{name}.onnx" for name in args.light]:
        model = onnx.load(str(path))
        names = {i.name for i in model.graph.input}
        options = RewriteOptions(method=args.method, input_shapes=tuple(
            s for s in args.input_shapes if s[0] in names))
        feeds = plan_feeds(model, input_shapes=options.input_shapes).feeds()
        expected = make_session(model, 1).run(None, feeds)[0]
        models = {"original": model}
        for variant in VARIANTS[args.experiment]:
            models[variant[0]] = rewritten(model, options, variant)
            got = make_session(models[variant[0]], 1).run(None, feeds)[0]
            error = float(np.abs(got.astype(np.float64) - expected).max())
            print(f"{path.name}: {variant[0]}: max abs error {error:.1e}")
        timings = compare_models(models, feeds, threads=(1,), repeats=args.repeats)[1]
        print("  " + ", ".join(f"{t.label} {t.ratio:.3f}x" for t in itertools.islice(
            timings, 1, None)) + f" (original {timings[0].median_ms:.2f} ms, 1 thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
