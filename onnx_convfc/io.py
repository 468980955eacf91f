"""Reading and writing models: clear one-line errors in, atomic writes out."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from onnx import ModelProto


class InputError(ValueError):
    """The input cannot be used; the message is one line meant for the user."""


def load_model(path: str | os.PathLike) -> ModelProto:
    """Load a model with its external data, or raise ``InputError`` with one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as err:  # noqa: BLE001 - protobuf and onnx raise many error types
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes)")
    return model


def save_model(model: ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically: a temporary file in the same folder, renamed.

    An interrupted or failed write leaves whatever was at ``path`` untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise InputError(f"{path}: cannot write ({err.strerror or err})") from None
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
