"""Run the fuzz properties of ``tests/test_hostile.py`` with many more examples than CI does.

The properties: the CLI contract on damaged bytes and on mutated fields of the demo model,
and every lowering of the conv family (Conv, ConvTranspose, ConvInteger, QLinearConv) on
random geometries against onnxruntime's own kernels (onnx.reference where onnxruntime refuses
the original). Prints hypothesis' statistics per property: examples run, how many were
invalid (filtered), which lowerings they reached; a failure prints its minimal example and
the ``@reproduce_failure`` line to replay it.

example:
  python tools/fuzz.py --examples 2000               # every property, 2000 examples each
  python tools/fuzz.py --examples 500 --only geometry --seed 7
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {"all": "fuzz", "cli": "fuzz_cli", "geometry": "geometry"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("example:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000,
                        help="examples per property (default: %(default)s)")
    parser.add_argument("--only", choices=sorted(GROUPS), default="all",
                        help="which properties (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="hypothesis seed, for a reproducible run")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error("--examples must be at least 1")

    import pytest

    os.environ["ONNX_CONVFC_FUZZ_EXAMPLES"] = str(args.examples)
    pytest_args = [str(ROOT / "tests" / "test_hostile.py"), "-q", "-p", "no:cacheprovider",
                   "-k", GROUPS[args.only], "--hypothesis-show-statistics"]
    if args.seed is not None:
        pytest_args.append(f"--hypothesis-seed={args.seed}")
    started = time.perf_counter()
    code = pytest.main(pytest_args)
    print(f"fuzz: {args.examples} examples per property, {args.only}, "
          f"{time.perf_counter() - started:.0f} s, "
          f"{'no failures' if code == 0 else 'FAILURES (see above)'}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
