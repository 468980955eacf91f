"""Rewrite cost and latency of real models: the numbers issue 7 sets targets for.

For each model:
  io        median seconds of ``onnx.load`` + ``onnx.save`` of the input model, and of the
            rewritten model (when preparing materialises weights, the output is the bigger one)
  rewrite   median seconds of a whole rewrite: ``read_model`` + ``rewrite_model`` + ``save_model``
  memory    peak resident memory of one rewrite in a fresh interpreter (VmHWM, Linux), less
            that interpreter's peak after its imports, against 2 x the output file's size
  latency   onnxruntime CPU, rewritten / original at default threads and at 1 thread
            (``onnx_convfc.bench``: interleaved rounds, median of per-round ratios)
  profile   with --profile: where each model spends its time (1 thread, onnxruntime's
            profiler): the rewritten one per lowering and op type, both per conv kind

Run:
  python tools/bench.py models/demo_cnn.onnx
  python tools/bench.py --light resnet50 squeezenet --repeats 30 --json bench.json
  python tools/bench.py net.onnx --method pointwise --input-shape x:1x3x640x640 --profile
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

from onnx_convfc import Report, RewriteOptions, rewrite_model
from onnx_convfc.bench import DEFAULT_THREADS, LIGHT_MODELS, bench_models, parse_threads
from onnx_convfc.io import read_model, save_model
from onnx_convfc.options import METHODS, parse_input_shape
from onnx_convfc.profile import profile_lines

# VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss into a forked child.
MEMORY_CHILD = """
import json, sys
from onnx_convfc import RewriteOptions, rewrite_model
from onnx_convfc.io import read_model, save_model
def hwm_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
base = hwm_kib()
fields = json.loads(sys.argv[3])
fields["input_shapes"] = dict(fields["input_shapes"])  # name -> dims: updated makes them tuples
options = RewriteOptions().updated(**fields)
loaded = read_model(sys.argv[1])
model, _ = rewrite_model(loaded.model, options)
save_model(model, sys.argv[2], external_data=loaded.external_data)
print(json.dumps({"base_kib": base, "peak_kib": hwm_kib()}))
"""


def median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def io_seconds(path: Path, scratch: Path, repeats: int) -> float:
    return median_seconds(lambda: onnx.save(onnx.load(str(path)), str(scratch)), repeats)


def rewrite_seconds(path: Path, out: Path, options: RewriteOptions,
                    repeats: int) -> tuple[float, Report]:
    """Median seconds of a whole rewrite, and the last rewrite's report."""
    last: list[Report] = []

    def once() -> None:
        loaded = read_model(path)
        model, report = rewrite_model(loaded.model, options)
        save_model(model, out, external_data=loaded.external_data)
        last[:] = [report]

    return median_seconds(once, repeats), last[0]


def rewrite_memory(path: Path, out: Path, options: RewriteOptions) -> dict:
    """Peak RSS of a rewrite in a fresh interpreter, in MiB, with its post-import baseline."""
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path), str(out),
                           json.dumps(dataclasses.asdict(options))],
                          capture_output=True, text=True, check=True)
    kib = json.loads(done.stdout.strip().splitlines()[-1])
    return {"baseline_mib": kib["base_kib"] / 1024, "peak_mib": kib["peak_kib"] / 1024,
            "over_baseline_mib": (kib["peak_kib"] - kib["base_kib"]) / 1024}


def measure(path: Path, options: RewriteOptions, args: argparse.Namespace) -> dict:
    inputs = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    options = options.updated(  # each --input-shape applies to the models that have the input
        input_shapes=tuple(s for s in options.input_shapes if s[0] in inputs))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / (path.stem + ".convfc.onnx")
        row: dict = {"model": str(path), "method": options.method,
                     "weight_left": options.weight_left}
        row["rewrite_s"], report = rewrite_seconds(path, out, options, args.io_repeats)
        row["io_input_s"] = io_seconds(path, Path(folder) / "in_copy.onnx", args.io_repeats)
        row["io_output_s"] = io_seconds(out, Path(folder) / "out_copy.onnx", args.io_repeats)
        row["input_mib"] = path.stat().st_size / 2**20
        row["output_mib"] = out.stat().st_size / 2**20
        row["memory"] = rewrite_memory(path, Path(folder) / "mem.onnx", options)
        bench = bench_models(path, out, threads=args.threads, repeats=args.repeats,
                             input_shapes=options.input_shapes, profile=args.profile,
                             lowerings=report)
        row["latency"] = {r.threads: {"original_ms": r.original_ms,
                                      "rewritten_ms": r.rewritten_ms, "ratio": r.ratio,
                                      "q25": r.ratio_q25, "q75": r.ratio_q75}
                          for r in bench.rows}
        if bench.profile is not None:
            row["profile"] = bench.profile.to_dict()
            row["optimized_transposes"] = sum(n.op_type == "Transpose"
                                              for n in bench.profile.optimized.graph.node)
    return row


def show(row: dict) -> None:
    mem = row["memory"]
    io = max(row["io_input_s"], row["io_output_s"])
    left = " --weight-left" if row.get("weight_left") else ""
    print(f"\n{row['model']}  (--method {row['method']}{left})")
    print(f"  rewrite {row['rewrite_s']:.3f} s; load+save {row['io_input_s']:.3f} s (input), "
          f"{row['io_output_s']:.3f} s (output): {row['rewrite_s'] / io:.2f}x the larger "
          "(target <= 1.5)")
    print(f"  memory: peak {mem['peak_mib']:.0f} MiB, {mem['over_baseline_mib']:.0f} MiB over "
          f"the {mem['baseline_mib']:.0f} MiB baseline; output {row['output_mib']:.1f} MiB "
          f"(over baseline / output = {mem['over_baseline_mib'] / row['output_mib']:.2f}, "
          "target <= 2)")
    for threads, lat in row["latency"].items():
        print(f"  latency threads={threads}: {lat['original_ms']:.2f} ms -> "
              f"{lat['rewritten_ms']:.2f} ms, ratio {lat['ratio']:.3f} "
              f"[{lat['q25']:.3f}-{lat['q75']:.3f}]")
    for line in profile_lines(row["profile"]) if "profile" in row else []:
        print(f"  {line}")
    if "optimized_transposes" in row:
        print(f"  Transposes left after onnxruntime's optimisations: {row['optimized_transposes']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("models", nargs="*", type=Path, help=".onnx files")
    parser.add_argument("--light", nargs="+", default=[], metavar="NAME",
                        help="models bundled with the onnx package, e.g. resnet50 squeezenet")
    parser.add_argument("--method", default="auto", choices=METHODS)
    parser.add_argument("--only", action="append", default=[], metavar="GLOB|LOWERING")
    parser.add_argument("--weight-left", action="store_true",
                        help="the rewrite option of that name (weight as MatMul's A)")
    parser.add_argument("--input-shape", dest="input_shapes", action="append", default=[],
                        type=parse_input_shape, metavar="NAME:DxD..")
    parser.add_argument("--threads", type=parse_threads, default=(DEFAULT_THREADS, 1),
                        help="intra-op thread counts, 'default' = onnxruntime's choice "
                             "(default: default,1)")
    parser.add_argument("--repeats", type=int, default=20, help="latency rounds")
    parser.add_argument("--io-repeats", type=int, default=3, help="rewrite and io repeats")
    parser.add_argument("--profile", action="store_true",
                        help="where the time goes: per lowering, op type and conv kind")
    parser.add_argument("--json", type=Path, help="write all rows here")
    args = parser.parse_args()
    paths = list(args.models) + [LIGHT_MODELS / f"light_{name}.onnx" for name in args.light]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        print(f"bench: no such model: {', '.join(missing) or '(none given)'}", file=sys.stderr)
        return 2
    options = RewriteOptions(method=args.method, only=tuple(args.only),
                             input_shapes=tuple(args.input_shapes), weight_left=args.weight_left)
    rows = []
    for path in paths:
        try:
            row = measure(path, options, args)
        except (ValueError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            print(f"\n{path}: skipped ({detail.strip().splitlines()[-1]})")
            continue
        show(row)
        rows.append(row)
    show_summary(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def show_summary(rows: list[dict]) -> None:
    """Geometric mean of the latency ratios over the models, per thread count."""
    if len(rows) < 2:
        return
    for threads in rows[0]["latency"]:
        ratios = [r["latency"][threads]["ratio"] for r in rows if threads in r["latency"]]
        worst = max(rows, key=lambda r: r["latency"].get(threads, {}).get("ratio", 0))
        print(f"\ngeometric mean ratio, threads={threads}: {statistics.geometric_mean(ratios):.3f} "
              f"over {len(ratios)} models; worst {worst['latency'][threads]['ratio']:.3f} "
              f"({Path(worst['model']).name})")


if __name__ == "__main__":
    raise SystemExit(main())
