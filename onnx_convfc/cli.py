"""Command line: ``onnx-convfc rewrite | check | inspect | explain | bench``.

This module only parses arguments and calls the public API; rewrite flags are generated
from ``RewriteOptions`` so the CLI and the Python API take the same options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from rich.console import Console

from . import __version__, check_parity, rewrite_model
from .bench import add_bench_args, bench_kwargs, bench_models
from .explain import explain_model
from .inputs import argtype
from .io import (
    PROTOBUF_LIMIT,
    InputError,
    StagedSave,
    initializer_bytes,
    load_model,
    read_model,
    save_model,
    save_text,
)
from .options import RewriteOptions
from .parity import add_parity_args, parity_kwargs
from .prepare import PrepareError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
FAILED_NOTHING_WRITTEN = ("parity failed: nothing written; rerun without --verify to keep the "
                          "output anyway")

REWRITE_HELP = """Rewrite every Conv of a model into MatMul (fully connected) form.

example:
  onnx-convfc rewrite models/demo_cnn.onnx                 # writes models/demo_cnn.convfc.onnx
  onnx-convfc rewrite net.onnx -o net_fc.onnx --method im2col --skip 'head/*'
  onnx-convfc rewrite det.onnx --verify --input-shape x:1x3x640x640 --providers cpu,cuda
"""

CHECK_HELP = """Run two models with onnxruntime on the same inputs and compare every output.

Exit code 0 when parity holds, 1 when it fails, 2 on bad input.

example:
  onnx-convfc check net.onnx net.convfc.onnx --input-shape images:1x3x640x640
  onnx-convfc check net.onnx net.convfc.onnx --per-node --atol logits:1e-3 --providers cpu,cuda
  onnx-convfc check vad.onnx vad.convfc.onnx --input-value sr:16000 --inputs audio.npz
"""

BENCH_HELP = """Time two models with onnxruntime side by side: interleaved runs, medians, ratio.

The ratio is rewritten / original, the median of per-round ratios, with its 25th-75th
percentiles as the noise figure. Inputs and providers take the same options as check.
--profile then says where the time goes (onnxruntime's profiler, 1 thread): per lowering
and op type in the rewritten model, per conv kind in both.

example:
  onnx-convfc bench net.onnx net.convfc.onnx --threads default,1 --repeats 50
  onnx-convfc bench det.onnx det.convfc.onnx --input-shape x:1x3x640x640 --report-json b.json
  onnx-convfc rewrite net.onnx -o net.convfc.onnx --report-json rewrite.json
  onnx-convfc bench net.onnx net.convfc.onnx --threads 1 --rewrite-report rewrite.json
"""

EXPLAIN_HELP = """Show a conv as the fully connected layer it is for a fixed input shape:
the matrix's shape, bytes, non-zeros and density, and how they follow from the geometry.

example:
  onnx-convfc explain models/demo_cnn.onnx                      # list the convs
  onnx-convfc explain models/demo_cnn.onnx --node NAME --png b.png --npz b.npz
"""

INSPECT_HELP = """Print the plan for every conv (lowering or reason to skip); write nothing.

example:
  onnx-convfc inspect models/demo_cnn.onnx --method pointwise
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with code 2 and one line, as every other bad input does."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"onnx-convfc: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def add_rewrite_options(parser: argparse.ArgumentParser,
                        names: tuple[str, ...] | None = None) -> None:
    """One flag per ``RewriteOptions`` field (or per field in ``names``), help from metadata."""
    group = parser.add_argument_group("rewrite options")
    for f in fields(RewriteOptions):
        if names is not None and f.name not in names:
            continue
        meta = dict(f.metadata)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        parse = meta.pop("parse", None)
        kwargs = {"dest": f.name, **meta}
        if isinstance(f.default, tuple):
            kwargs.update(action="append", default=[], type=argtype(parse) if parse else str)
        else:
            kwargs.update(default=f.default if f.default is not MISSING else None)
            if parse:
                kwargs["type"] = argtype(parse)
            kwargs["help"] = f"{kwargs['help']} (default: %(default)s)"
        group.add_argument(flag, **kwargs)


def options_from_args(args: argparse.Namespace) -> RewriteOptions:
    values = {f.name: getattr(args, f.name) for f in fields(RewriteOptions)
              if hasattr(args, f.name)}  # a verb may take only some of them
    return RewriteOptions().updated(**values)


def _verb(verbs, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A verb whose ``--help`` keeps its description's examples as written."""
    return verbs.add_parser(name, help=summary, description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnx-convfc",
                     description="Rewrite the convolutions of an ONNX model into MatMul "
                                 "(fully connected) form, prove parity, save it.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    rw = _verb(verbs, "rewrite", "rewrite convs into MatMul form and save", REWRITE_HELP)
    rw.add_argument("model", help="input .onnx file")
    rw.add_argument("-o", "--output", help="output path (default: IN.convfc.onnx beside the input)")
    rw.add_argument("--inplace", action="store_true", help="replace the input file (atomically)")
    rw.add_argument("--report-json", metavar="FILE",
                    help="write the report as JSON (parity under 'parity' with --verify)")
    rw.add_argument("--quiet", action="store_true", help="print only the summary line")
    rw.add_argument("--verify", action="store_true",
                    help="check parity with the original and save only if it holds (on "
                         "failure: exit 1, nothing written)")
    add_rewrite_options(rw)
    add_parity_args(rw, input_shape=False)  # --input-shape is a rewrite option already
    rw.set_defaults(run=_rewrite)

    chk = _verb(verbs, "check", "compare two models' outputs with onnxruntime", CHECK_HELP)
    chk.add_argument("original", help="the reference .onnx model")
    chk.add_argument("rewritten", help="the .onnx model to check against it")
    chk.add_argument("--report-json", metavar="FILE", help="write the parity report as JSON")
    add_parity_args(chk)
    chk.set_defaults(run=_check)

    ins = _verb(verbs, "inspect", "print the plan, write nothing", INSPECT_HELP)
    ins.add_argument("model", help="input .onnx file")
    ins.add_argument("--report-json", metavar="FILE", help="write the plan as JSON")
    add_rewrite_options(ins)
    ins.set_defaults(run=_inspect, quiet=False)

    exp = _verb(verbs, "explain", "show the dense (fully connected) matrix of a conv", EXPLAIN_HELP)
    exp.add_argument("model", help="input .onnx file")
    exp.add_argument("--node", metavar="NAME", help="the conv to explain (default: list them all)")
    exp.add_argument("--png", metavar="FILE", help="draw the matrix's structure (plot extra)")
    exp.add_argument("--npz", metavar="FILE",
                     help="export the matrix (scipy.sparse CSR when scipy is installed)")
    add_rewrite_options(exp, names=("input_shapes", "max_dense_bytes"))
    exp.set_defaults(run=_explain)

    ben = _verb(verbs, "bench", "onnxruntime latency of original vs rewritten", BENCH_HELP)
    ben.add_argument("original", help="the reference .onnx model")
    ben.add_argument("rewritten", help="the .onnx model to time against it")
    ben.add_argument("--report-json", metavar="FILE", help="write the timings as JSON")
    add_bench_args(ben)
    ben.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Tables keep their full width when piped (rich would assume 80 columns and wrap rows).
    console = Console(highlight=False, soft_wrap=True,
                      width=None if sys.stdout.isatty() else 200)
    try:
        _writable(getattr(args, "report_json", None))  # every verb, before any work
        return args.run(args, console)
    except (InputError, PrepareError, ValueError) as err:
        print(f"onnx-convfc: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("onnx-convfc: interrupted (writes are atomic: no partial file is left)",
              file=sys.stderr)
        return 130
    except MemoryError:
        print("onnx-convfc: error: out of memory; lower --max-output-bytes or --max-dense-bytes "
              "to refuse such a rewrite early", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - an unattended run gets one line, not a traceback
        if os.environ.get("ONNX_CONVFC_TRACEBACK"):
            raise
        print(f"onnx-convfc: error: internal error ({type(err).__name__}: "
              f"{' '.join(str(err).split())[:300]}); rerun with ONNX_CONVFC_TRACEBACK=1 "
              "and report it", file=sys.stderr)
        return EXIT_USAGE


def _output_path(args: argparse.Namespace) -> Path:
    src = Path(args.model)
    if args.inplace:
        if args.output:
            raise InputError("give either -o/--output or --inplace, not both")
        return src
    out = Path(args.output) if args.output else src.with_name(src.stem + ".convfc.onnx")
    if out.resolve() == src.resolve():
        raise InputError(f"{out}: refusing to overwrite the input; pass --inplace to do that")
    return out


def _writable(path: str | None) -> None:
    """Refuse a report path whose folder cannot take it, before anything is written."""
    if path is None:
        return
    folder = Path(path).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise InputError(f"{path}: cannot write (folder {folder} is missing or read-only)")


def _rewrite(args: argparse.Namespace, console: Console) -> int:
    out = _output_path(args)
    options = options_from_args(args)
    loaded = read_model(args.model)
    original = loaded.model
    model, report = rewrite_model(original, options)
    parity = _save_verified(args, original, model, out, loaded.external_data)
    _show(report, args, console, parity)
    if parity is not None and not parity.passed:
        print(FAILED_NOTHING_WRITTEN, file=sys.stderr)
        return EXIT_FAILED
    if not args.quiet:
        console.print(f"wrote {out}")
    return EXIT_OK


def _save_verified(args: argparse.Namespace, original, model, out: Path, external_data: bool):
    """Save ``model`` to ``out``; with ``--verify``, only if parity holds (a deployment step
    must not leave a model that failed it). A model that fits in one protobuf is verified
    before saving, a larger one from a staged copy (``io.StagedSave``). Returns the parity
    report, ``None`` without ``--verify``."""
    if not args.verify:
        save_model(model, out, external_data=external_data)
        return None
    # Half the limit leaves room for nodes and Constant values without serialising the model.
    if initializer_bytes(model) <= PROTOBUF_LIMIT // 2:
        parity = check_parity(original, model, **parity_kwargs(args))
        if parity.passed:
            save_model(model, out, external_data=external_data)
        return parity
    with StagedSave(out) as staged:
        save_model(model, staged.path, external_data=external_data)
        parity = check_parity(original, staged.path, **parity_kwargs(args))
        if parity.passed:
            staged.commit()
    return parity


def _check(args: argparse.Namespace, console: Console) -> int:
    parity = check_parity(args.original, args.rewritten, **parity_kwargs(args))
    if args.report_json:
        parity.write_json(args.report_json)
    parity.render(console)
    return EXIT_OK if parity.passed else EXIT_FAILED


def _bench(args: argparse.Namespace, console: Console) -> int:
    report = bench_models(args.original, args.rewritten, **bench_kwargs(args))
    if args.report_json:
        report.write_json(args.report_json)
    report.render(console)
    return EXIT_OK


def _explain(args: argparse.Namespace, console: Console) -> int:
    explain_model(load_model(args.model), options_from_args(args), console,
                  node=args.node, png=args.png, npz=args.npz)
    return EXIT_OK


def _inspect(args: argparse.Namespace, console: Console) -> int:
    _, report = rewrite_model(load_model(args.model), options_from_args(args))
    _show(report, args, console)
    return EXIT_OK


def _show(report, args, console: Console, parity=None) -> None:
    """Print (and write as JSON) the rewrite report, with the parity report when verified."""
    if args.report_json:
        data = report.to_dict()
        if parity is not None:
            data["parity"] = parity.to_dict()
        save_text(json.dumps(data, indent=2) + "\n", args.report_json)
    if args.quiet:
        console.print(report.summary())
    else:
        report.render(console)
    if parity is not None and args.quiet:
        console.print(parity.summary())
    elif parity is not None:
        parity.render(console)


if __name__ == "__main__":
    raise SystemExit(main())
