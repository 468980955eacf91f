"""Second round of lowering experiments (docs/performance.md, section 9): hand-built forms of
one conv, each checked against onnxruntime's Conv, then timed next to it (1 thread).

  python tools/experiments/round2.py chunks 96,24,160 128,32,56 64,64,56
  python tools/experiments/round2.py outside 128,32,56 96,24,160 64,64,56
  python tools/experiments/round2.py banded 1,8,28,5 8,16,14,5 16,32,16
  python tools/experiments/round2.py col2im 64,56 240,12 192,40,5
  python tools/experiments/round2.py broadcast 16,320 48,160 96,80

Arguments are ``C,M,SIZE[,K[,STRIDE]]`` (depthwise and broadcast: ``C,SIZE[,K]``), K=3 and
stride 1 unless given; pads are K//2, one image.

- chunks: im2col with one Gather and MatMul per run of output rows, 256 KiB to 4 MiB of
  patches per run, against the package's lowering of the same conv.
- outside: the 9 tap GEMMs first (``X[pixels, C] @ W[C, 9M]``), then a Gather of the shifted
  M-rows and a ReduceSum over the taps.
- banded: a row-Toeplitz FC layer per kernel row (``[OH, k*C*Wp] @ [k*C*Wp, OW*M]``).
- col2im: a depthwise conv as ``Col2Im(x * w_flipped)`` (opset 18).
- broadcast: a per-channel Mul channels-first ``[C, 1, 1]``, channels-last ``[C]`` and
  channels-last ``[W, C]``, on ``[1, C, S, S]`` / ``[1, S, S, C]`` inputs.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_convfc import rewrite_model
from onnx_convfc.bench import compare_models, make_session

OPSET = 18


def _model(nodes: list, inits: dict[str, np.ndarray], x_shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "form", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def conv(c: int, m: int, size: int, k: int, stride: int, group: int = 1,
         seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((m, c // group, k, k)) / np.sqrt(c // group * k * k))
    w = w.astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, pads=[k // 2] * 4,
                            strides=[stride] * 2)
    return _model([node], {"w": w, "b": b}, [1, c, size, size]), w, b


def _geometry(size: int, k: int, stride: int) -> tuple[int, int, int]:
    p = k // 2
    padded = size + 2 * p
    return p, padded, (padded - k) // stride + 1


def chunked_form(c, m, size, k, stride, w, b, chunk_bytes) -> onnx.ModelProto:
    p, padded, out = _geometry(size, k, stride)
    taps = k * k
    oh, ow = np.meshgrid(np.arange(out), np.arange(out), indexing="ij")
    ii, jj = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    index = ((oh * stride * padded + ow * stride)[:, :, None]
             + (ii * padded + jj).reshape(-1)).astype(np.int32)
    rows = max(1, chunk_bytes // (out * taps * c * 4))
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1]),
             helper.make_node("Pad", ["xt", "pads"], ["xp"]),
             helper.make_node("Reshape", ["xp", "pixels"], ["xf"])]
    inits = {"pads": np.array([0, p, p, 0, 0, p, p, 0]), "pixels": np.array([0, padded**2, c]),
             "B": w.transpose(2, 3, 1, 0).reshape(taps * c, m), "b": b,
             "rows": np.array([0, -1, out, taps * c])}
    pieces = []
    for i, start in enumerate(range(0, out, rows)):
        inits[f"index{i}"] = index[start:start + rows]
        nodes += [helper.make_node("Gather", ["xf", f"index{i}"], [f"g{i}"], axis=1),
                  helper.make_node("Reshape", [f"g{i}", "rows"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", "B"], [f"m{i}"])]
        pieces.append(f"m{i}")
    nodes += [helper.make_node("Concat", pieces, ["cat"], axis=1),
              helper.make_node("Add", ["cat", "b"], ["biased"]),
              helper.make_node("Transpose", ["biased"], ["y"], perm=[0, 3, 1, 2])]
    return _model(nodes, inits, [1, c, size, size])


def outside_form(c, m, size, k, stride, w, b) -> onnx.ModelProto:
    p, padded, out = _geometry(size, k, stride)
    taps = k * k
    oh, ow = np.meshgrid(np.arange(out), np.arange(out), indexing="ij")
    ii, jj = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    pixel = (oh * stride * padded + ow * stride).reshape(-1, 1)
    index = ((pixel + (ii * padded + jj).reshape(1, -1)) * taps + np.arange(taps))
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1]),
             helper.make_node("Pad", ["xt", "pads"], ["xp"]),
             helper.make_node("MatMul", ["xp", "W"], ["y9"]),
             helper.make_node("Reshape", ["y9", "rows"], ["y9r"]),
             helper.make_node("Gather", ["y9r", "index"], ["g"], axis=1),
             helper.make_node("ReduceSum", ["g", "axis"], ["s"], keepdims=0),
             helper.make_node("Add", ["s", "b"], ["biased"]),
             helper.make_node("Reshape", ["biased", "grid"], ["nhwc"]),
             helper.make_node("Transpose", ["nhwc"], ["y"], perm=[0, 3, 1, 2])]
    inits = {"pads": np.array([0, p, p, 0, 0, p, p, 0]),
             "W": w.transpose(1, 2, 3, 0).reshape(c, taps * m), "b": b,
             "rows": np.array([0, padded**2 * taps, m]), "index": index.astype(np.int32),
             "axis": np.array([2]), "grid": np.array([0, out, out, m])}
    return _model(nodes, inits, [1, c, size, size])


def banded_form(c, m, size, k, stride, w, b) -> onnx.ModelProto:
    p, padded, out = _geometry(size, k, stride)
    band = np.zeros((k, c, padded, out, m), np.float32)
    for i in range(k):
        for j in range(k):
            for o in range(out):
                band[i, :, o * stride + j, o, :] = w[:, :, i, j].T
    rows = (np.arange(out)[:, None] * stride + np.arange(k)[None, :])
    nodes = [helper.make_node("Pad", ["x", "pads"], ["xp"]),
             helper.make_node("Transpose", ["xp"], ["xt"], perm=[0, 2, 1, 3]),
             helper.make_node("Gather", ["xt", "rows"], ["g"], axis=1),
             helper.make_node("Reshape", ["g", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "band"], ["mm"]),
             helper.make_node("Add", ["mm", "bias"], ["biased"]),
             helper.make_node("Reshape", ["biased", "grid"], ["nhwc"]),
             helper.make_node("Transpose", ["nhwc"], ["y"], perm=[0, 3, 1, 2])]
    inits = {"pads": np.array([0, 0, p, p, 0, 0, p, p]), "rows": rows,
             "flat": np.array([0, out, k * c * padded]),
             "band": band.reshape(k * c * padded, out * m), "bias": np.tile(b, out),
             "grid": np.array([0, out, out, m])}
    return _model(nodes, inits, [1, c, size, size])


def col2im_form(c, size, k, w) -> onnx.ModelProto:
    """Stride 1: y[c, o] = sum_t w[c, t] x[c, o + t - p] is Col2Im's scatter of x times the
    flipped kernel, with pads k - 1 - p."""
    p = k // 2
    taps = k * k
    flipped = w.reshape(c, taps)[:, ::-1].reshape(1, c, taps, 1)
    nodes = [helper.make_node("Reshape", ["x", "unit"], ["xr"]),
             helper.make_node("Mul", ["xr", "wf"], ["z"]),
             helper.make_node("Reshape", ["z", "cols"], ["zc"]),
             helper.make_node("Col2Im", ["zc", "image", "block"], ["y"], pads=[k - 1 - p] * 4)]
    inits = {"unit": np.array([1, c, 1, size * size]), "wf": np.ascontiguousarray(flipped),
             "cols": np.array([1, c * taps, size * size]), "image": np.array([size, size]),
             "block": np.array([k, k])}
    return _model(nodes, inits, [1, c, size, size])


def _mul(x_shape: list[int], scale: np.ndarray) -> onnx.ModelProto:
    return _model([helper.make_node("Mul", ["x", "s"], ["y"])], {"s": scale}, x_shape)


def _check_and_time(models: dict[str, onnx.ModelProto], x: np.ndarray, label: str,
                    repeats: int) -> None:
    feeds = {"x": x}
    ref = make_session(models["conv"], 1).run(None, feeds)[0]
    scale = max(1.0, float(np.abs(ref).max()))
    for name, model in models.items():
        err = float(np.abs(make_session(model, 1).run(None, feeds)[0] - ref).max()) / scale
        assert err <= 1e-4, f"{label} {name}: error {err:.1e}"
    timings = compare_models(models, feeds, threads=(1,), repeats=repeats)[1]
    conv_ms = timings[0].median_ms
    ratios = ", ".join(f"{t.label} {t.ratio:.2f}" for t in timings[1:])
    print(f"{label}: Conv {conv_ms:.3f} ms; x the Conv: {ratios}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("what", choices=["chunks", "outside", "banded", "col2im", "broadcast"])
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    for case in args.cases:
        values = [int(v) for v in case.split(",")]
        if args.what == "broadcast":
            c, size = values[:2]
            first = rng.standard_normal((1, c, size, size)).astype(np.float32)
            last = np.ascontiguousarray(first.transpose(0, 2, 3, 1))
            scale = rng.standard_normal(c).astype(np.float32)
            timed = compare_models({"[C,1,1] channels-first": _mul(list(first.shape),
                                                                   scale[:, None, None])},
                                   {"x": first}, threads=(1,), repeats=args.repeats)[1]
            timed += compare_models({"[C] channels-last": _mul(list(last.shape), scale),
                                     "[W,C] channels-last": _mul(list(last.shape),
                                                                 np.tile(scale, (size, 1)))},
                                    {"x": last}, threads=(1,), repeats=args.repeats)[1]
            print(f"Mul {c} @{size}x{size}: " + ", ".join(f"{t.label} {t.median_ms:.3f} ms"
                                                         for t in timed), flush=True)
            continue
        if args.what == "col2im":
            c, size, k = (values + [3])[:3]
            model, w, _ = conv(c, c, size, k, 1, group=c)
            model.graph.node[0].input.pop()  # no bias
            forms = {"conv": model, "lowered": rewrite_model(model)[0],
                     "col2im": col2im_form(c, size, k, w)}
        else:
            c, m, size, k, stride = (values + [3, 1][len(values) - 3:])[:5]
            model, w, b = conv(c, m, size, k, stride)
            forms = {"conv": model, "lowered": rewrite_model(model)[0]}
            if args.what == "chunks":
                for size_kib in (256, 1024, 4096):
                    forms[f"{size_kib} KiB"] = chunked_form(c, m, size, k, stride, w, b,
                                                            size_kib << 10)
            elif args.what == "outside":
                forms["outside"] = outside_form(c, m, size, k, stride, w, b)
            else:
                forms["banded"] = banded_form(c, m, size, k, stride, w, b)
        x = rng.standard_normal((1, c, size, size)).astype(np.float32)
        _check_and_time(forms, x, f"{args.what} {case}", args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
