"""Command line: ``onnx-convfc rewrite | inspect``.

This module only parses arguments and calls the public API; rewrite flags are generated
from ``RewriteOptions`` so the CLI and the Python API take the same options.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from rich.console import Console

from . import __version__, rewrite_model
from .io import InputError, load_model, save_model
from .options import RewriteOptions
from .prepare import PrepareError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

REWRITE_HELP = """Rewrite every Conv of a model into MatMul (fully connected) form.

example:
  onnx-convfc rewrite models/demo_cnn.onnx                 # writes models/demo_cnn.convfc.onnx
  onnx-convfc rewrite net.onnx -o net_fc.onnx --method im2col --skip 'head/*'
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


def add_rewrite_options(parser: argparse.ArgumentParser) -> None:
    """One flag per ``RewriteOptions`` field, help text taken from its metadata."""
    group = parser.add_argument_group("rewrite options")
    for f in fields(RewriteOptions):
        meta = dict(f.metadata)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        parse = meta.pop("parse", None)
        kwargs = {"dest": f.name, **meta}
        if isinstance(f.default, tuple):
            kwargs.update(action="append", default=[], type=parse or str)
        else:
            kwargs.update(default=f.default if f.default is not MISSING else None)
            if parse:
                kwargs["type"] = parse
            kwargs["help"] = f"{kwargs['help']} (default: %(default)s)"
        group.add_argument(flag, **kwargs)


def options_from_args(args: argparse.Namespace) -> RewriteOptions:
    values = {f.name: getattr(args, f.name) for f in fields(RewriteOptions)}
    return RewriteOptions().updated(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnx-convfc", description=__doc__.splitlines()[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    rw = verbs.add_parser("rewrite", help="rewrite convs into MatMul form and save",
                          description=REWRITE_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    rw.add_argument("model", help="input .onnx file")
    rw.add_argument("-o", "--output", help="output path (default: IN.convfc.onnx beside the input)")
    rw.add_argument("--inplace", action="store_true", help="replace the input file (atomically)")
    rw.add_argument("--report-json", metavar="FILE", help="write the report as JSON")
    rw.add_argument("--quiet", action="store_true", help="print only the summary line")
    add_rewrite_options(rw)
    rw.set_defaults(run=_rewrite)

    ins = verbs.add_parser("inspect", help="print the plan, write nothing",
                           description=INSPECT_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    ins.add_argument("model", help="input .onnx file")
    ins.add_argument("--report-json", metavar="FILE", help="write the plan as JSON")
    add_rewrite_options(ins)
    ins.set_defaults(run=_inspect, quiet=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    try:
        return args.run(args, console)
    except (InputError, PrepareError, ValueError) as err:
        print(f"onnx-convfc: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("onnx-convfc: interrupted; nothing was written", file=sys.stderr)
        return 130


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


def _rewrite(args: argparse.Namespace, console: Console) -> int:
    out = _output_path(args)
    options = options_from_args(args)
    model, report = rewrite_model(load_model(args.model), options)
    save_model(model, out)
    _show(report, args, console)
    if not args.quiet:
        console.print(f"wrote {out}")
    return EXIT_OK


def _inspect(args: argparse.Namespace, console: Console) -> int:
    _, report = rewrite_model(load_model(args.model), options_from_args(args))
    _show(report, args, console)
    return EXIT_OK


def _show(report, args, console: Console) -> None:
    if args.report_json:
        try:
            report.write_json(args.report_json)
        except OSError as err:
            raise InputError(f"{args.report_json}: cannot write ({err.strerror})") from None
    if args.quiet:
        console.print(report.summary())
    else:
        report.render(console)


if __name__ == "__main__":
    raise SystemExit(main())
