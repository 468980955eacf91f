"""Reading and writing models: clear one-line errors in, atomic writes out.

External data is read only from files inside the model's folder (a location that is absolute,
climbs out with ``..`` or leads out through a symlink is refused before anything is read), and
every byte range is checked against the file before it is read. Writes go to temporary files
in the destination folder that are renamed into place, the external data file first.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, helper

# Protobuf cannot serialise a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
# Tensors at least this large go to the external data file when one is written.
EXTERNAL_MIN_BYTES = 1024
# Offsets of tensors in a written external data file are multiples of this.
EXTERNAL_ALIGN = 64
# Element types stored packed (several elements per byte); no size check for them.
_PACKED = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1",
                                             "FLOAT6E2M3", "FLOAT6E3M2") if hasattr(TensorProto, n)}


class InputError(ValueError):
    """The input cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class LoadedModel:
    """A model read from disk, its data loaded, and whether that data was external."""

    model: ModelProto
    path: Path
    external_data: bool


def load_model(path: str | os.PathLike) -> ModelProto:
    """Load a model with its external data, or raise ``InputError`` with one line."""
    return read_model(path).model


def read_model(path: str | os.PathLike) -> LoadedModel:
    """Like ``load_model``, and also tell whether the model kept tensors in external files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf and onnx raise many error types
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes)")
    external = [t for t in _all_tensors(model) if t.data_location == TensorProto.EXTERNAL]
    for tensor in external:
        _load_external(tensor, path)
    return LoadedModel(model, path, bool(external))


def save_model(model: ModelProto, path: str | os.PathLike, *, external_data: bool = False) -> None:
    """Write ``model`` to ``path`` atomically: temporary files in the same folder, renamed.

    Tensors go to ``<file name>.data`` beside the model when ``external_data`` is true (pass
    ``LoadedModel.external_data`` to keep the input's layout) or when the model would not fit
    in one protobuf. ``model`` is left as it was. A failed write leaves ``path`` untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: folder {folder} does not exist")
    if external_data or _serialized_size(model) > PROTOBUF_LIMIT:
        _save_with_external_data(model, path, folder)
    else:
        _write_atomically(path, folder, [model.SerializeToString()])


def _load_external(tensor: TensorProto, model_path: Path) -> None:
    info = {entry.key: entry.value for entry in tensor.external_data}
    where = f"{model_path}: tensor '{tensor.name}'"
    location = info.get("location", "")
    if not location:
        raise InputError(f"{where}: external data without a location")
    if Path(location).is_absolute() or PureWindowsPath(location).drive or \
            PureWindowsPath(location).is_absolute():
        raise InputError(f"{where}: external data location '{location}' is absolute; "
                         "refusing to read outside the model's folder")
    folder = model_path.parent.resolve()  # as onnxruntime does: the folder the path names
    file = (folder / location).resolve()
    if not file.is_relative_to(folder):
        raise InputError(f"{where}: external data location '{location}' leads outside the "
                         f"model's folder (to {file}); refusing to read it")
    if not file.is_file():
        raise InputError(f"{where}: external data file '{location}' is missing")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InputError(f"{where}: external data offset/length are not integers") from None
    needed = _data_bytes(tensor)
    if length is not None and needed is not None and length != needed:
        raise InputError(f"{where}: external data length {length} does not match the "
                         f"{needed} bytes its shape needs")
    size = file.stat().st_size
    if length is None:
        length = needed if needed is not None else max(size - offset, 0)
    if offset < 0 or offset + length > size:
        raise InputError(f"{where}: external data file '{location}' is short (needs bytes "
                         f"{offset}..{offset + length}, the file has {size})")
    with open(file, "rb") as f:
        f.seek(offset)
        tensor.raw_data = f.read(length)
    tensor.ClearField("data_location")
    del tensor.external_data[:]


def _data_bytes(tensor: TensorProto) -> int | None:
    """Bytes of the tensor's raw data, or ``None`` where it cannot be told from its type."""
    if tensor.data_type in _PACKED or tensor.data_type == TensorProto.STRING:
        return None
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    return math.prod(tensor.dims) * itemsize


def _save_with_external_data(model: ModelProto, path: Path, folder: Path) -> None:
    """Move large initializers' bytes to ``<name>.data``, write both files, restore ``model``."""
    location = f"{path.name}.data"
    moved: list[tuple[TensorProto, bytes, bool]] = []
    chunks: list[bytes] = []
    offset = 0
    try:
        for tensor in _initializers(model.graph):
            if len(tensor.raw_data) < EXTERNAL_MIN_BYTES:
                continue
            data = tensor.raw_data
            padding = -offset % EXTERNAL_ALIGN
            chunks.extend((b"\0" * padding, data))
            offset += padding
            moved.append((tensor, data, tensor.HasField("data_location")))
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset),
                               ("length", len(data))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            offset += len(data)
        body = model.SerializeToString()
    finally:
        for tensor, data, had_location in moved:
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            if had_location:
                tensor.data_location = TensorProto.DEFAULT
            tensor.raw_data = data
    _write_atomically(path, folder, [body], (folder / location, chunks))


def _write_atomically(path: Path, folder: Path, chunks: list[bytes],
                      sidecar: tuple[Path, list[bytes]] | None = None) -> None:
    """Write every file to a temporary name first; rename the sidecar, then the model."""
    jobs = ([sidecar] if sidecar else []) + [(path, chunks)]
    temps: list[str] = []
    try:
        for target, parts in jobs:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
        for (target, _), tmp in zip(jobs, temps):
            os.replace(tmp, target)
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)


def _serialized_size(model: ModelProto) -> int:
    try:
        return model.ByteSize()
    except Exception:  # noqa: BLE001 - some protobuf builds refuse to size huge messages
        return PROTOBUF_LIMIT + 1


def _graphs(graph: GraphProto) -> Iterator[GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _initializers(graph: GraphProto) -> Iterator[TensorProto]:
    for g in _graphs(graph):
        yield from g.initializer


def _all_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every tensor that may hold data: initializers and tensor attributes, at any depth."""
    holders = [*_graphs(model.graph)]
    for function in model.functions:
        holders.append(function)
        for node in function.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.GRAPH:
                    holders.extend(_graphs(attr.g))
                for sub in attr.graphs:
                    holders.extend(_graphs(sub))
    for holder in holders:
        if isinstance(holder, GraphProto):
            yield from holder.initializer
            for sparse in holder.sparse_initializer:
                yield from (sparse.values, sparse.indices)
        for node in holder.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
