"""GEMM floor (issue 7): can any im2col lowering match onnxruntime's Conv on ResNet-50's geometries?

For each conv geometry of ResNet-50 (no bias: BatchNormalization follows), times
onnxruntime's Conv against the lowering's MatMul alone, fed a ready-made patch matrix
[1, L, K] @ [K, M]. The MatMul is what no patch-building trick can remove, so its ratio is
the best any im2col form can reach; the rest of a lowered conv's time is moving bytes.

Run: python tools/experiments/gemm_floor.py [--repeats 40]
"""

from __future__ import annotations

import argparse

import numpy as np
from forms import Builder, Layer, conv_form, feeds_for, layer, rows_tap_channel

from onnx_convfc.bench import format_table, make_session, time_interleaved

GEOMETRIES = (  # c, m, k, size, stride, count in ResNet-50
    (3, 64, 7, 224, 2, 1), (64, 64, 3, 56, 1, 3), (64, 256, 1, 56, 1, 4),
    (256, 64, 1, 56, 1, 2), (128, 128, 3, 28, 1, 3), (128, 512, 1, 28, 1, 4),
    (512, 128, 1, 28, 1, 3), (256, 256, 3, 14, 1, 5), (256, 1024, 1, 14, 1, 6),
    (1024, 256, 1, 14, 1, 5), (512, 512, 3, 7, 1, 2), (512, 2048, 1, 7, 1, 3),
    (2048, 512, 1, 7, 1, 2),
)


class FixedFeeds:
    """A session that always runs on its own feeds (the GEMM takes patches, not an image)."""

    def __init__(self, session, feeds) -> None:
        self.session, self.feeds = session, feeds

    def run(self, names, _feeds):
        return self.session.run(names, self.feeds)


def gemm_only(ly: Layer) -> tuple[object, dict]:
    matrix = rows_tap_channel(ly.weight)
    b = Builder()
    model = b.model([1, ly.out * ly.out, matrix.shape[0]], b.op("MatMul", "X", b.const(matrix)))
    rng = np.random.default_rng(0)
    return model, {"X": rng.standard_normal((1, ly.out * ly.out, matrix.shape[0]),
                                            dtype=np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    for c, m, k, size, stride, count in GEOMETRIES:
        ly = layer(c, m, k, size, stride=stride)
        ly = Layer(ly.weight, None, ly.size, ly.stride, ly.pad, 1)
        b = Builder()
        conv = b.model([1, c, size, size], conv_form(b, "X", ly))
        gemm, gemm_feeds = gemm_only(ly)
        results = {}
        for n in (2, 1):
            sessions = {"conv": make_session(conv, n),
                        "matmul_only": FixedFeeds(make_session(gemm, n), gemm_feeds)}
            results[n] = time_interleaved(sessions, feeds_for(ly), repeats=args.repeats)
        print(f"\n## {k}x{k} {c}->{m} @{size} stride {stride} (x{count} in ResNet-50)")
        print(format_table(results, "CPUExecutionProvider"))


if __name__ == "__main__":
    main()
