"""Reading and writing models: clear one-line errors in, atomic writes out.

External data is read only from files inside the model's folder (a location that is absolute,
climbs out with ``..`` or leads out through a symlink is refused before anything is read), and
every byte range is checked against the file before it is read. Writes go to temporary files
in the destination folder that are renamed into place, the external data file first.
"""

from __future__ import annotations

import os
import secrets
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import onnx
from onnx import GraphProto, ModelProto, TensorProto

from .graphs import graphs, subgraphs
from .serialize import ExternalLayout, TooLarge, model_chunks
from .skeleton import data_nbytes

# Protobuf cannot serialise a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
# Tensors at least this large go to the external data file when one is written.
EXTERNAL_MIN_BYTES = 1024
# Offsets of tensors in a written external data file are multiples of this.
EXTERNAL_ALIGN = 64


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
    if not path.is_file():  # a folder, or a FIFO that would block the read
        raise InputError(f"{path}: " + ("not a regular file" if path.exists() else "no such file"))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf and onnx raise many error types
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes)")
    check_structure(model, str(path))
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
    folder = _folder(path)
    initializer_bytes = sum(data_nbytes(t) or 0 for t in model.graph.initializer)
    if not external_data and initializer_bytes <= PROTOBUF_LIMIT:
        try:  # written a piece at a time (``serialize.py``): no copy of the whole model
            _write_atomically(path, folder, model_chunks(model, limit=PROTOBUF_LIMIT))
            return
        except TooLarge:
            pass
    layout = ExternalLayout(f"{path.name}.data", EXTERNAL_MIN_BYTES, EXTERNAL_ALIGN)
    _write_atomically(path, folder, model_chunks(model, layout),
                      (folder / layout.location, layout.data_chunks(model)))


def save_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file (a JSON report) atomically, the way ``save_model`` writes models."""
    path = Path(path)
    _write_atomically(path, _folder(path), [text.encode()])


def _folder(path: Path) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: folder {folder} does not exist")
    return folder


def check_structure(model: ModelProto, where: str = "model") -> None:
    """Refuse a graph that breaks the ONNX rules, as onnx's checker finds them: dangling or
    unsorted inputs, cycles, names assigned twice, tensors whose data does not fit their
    shape, attributes of the wrong type, missing opsets. Rewriting such a graph would only
    hide the damage in a new file. Call it before external data is loaded (``read_model``
    checks that data itself), so that the model fits in one protobuf.

    Two things onnxruntime accepts are let through: graph inputs and outputs that declare no
    shape (onnx-graphsurgeon writes them), and external data (the checker would look for it
    from the working directory). They are hidden from the checker by editing ``model`` in
    place and restoring it afterwards: a copy would double the memory of a large model.

    Raises:
        InputError: with the checker's message on one line.
    """
    shapeless = [v for g in graphs(model.graph) for v in (*g.input, *g.output)
                 if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")]
    external = [(t, list(t.dims), [(e.key, e.value) for e in t.external_data])
                for t in _all_tensors(model) if t.data_location == TensorProto.EXTERNAL]
    try:
        for value in shapeless:
            value.type.tensor_type.shape.SetInParent()
        for tensor, _, _ in external:
            tensor.ClearField("data_location")
            del tensor.external_data[:]
            tensor.dims[:] = [0]
        onnx.checker.check_model(model)
    except Exception as err:  # noqa: BLE001 - ValidationError, and protobuf's own errors
        raise InputError(f"{where}: not a valid ONNX model ({_one_line(err)})") from None
    finally:
        for value in shapeless:
            value.type.tensor_type.ClearField("shape")
        for tensor, dims, entries in external:
            tensor.data_location = TensorProto.EXTERNAL
            tensor.dims[:] = dims
            for key, value in entries:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value


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
        problem = "is not a regular file" if file.exists() else "is missing"
        raise InputError(f"{where}: external data file '{location}' {problem}")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InputError(f"{where}: external data offset/length are not integers") from None
    needed = data_nbytes(tensor)
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


def _write_atomically(path: Path, folder: Path, chunks: Iterable[bytes],
                      sidecar: tuple[Path, Iterable[bytes]] | None = None) -> None:
    """Write every file to a temporary name in ``folder``, then rename them into place, the
    sidecar first and the model last: the model's rename is when the new output appears.

    A failure before that (a full disk, an exception) leaves every target as it was and
    removes the temporary files; Ctrl-C is held back while the files are renamed. Temporary
    files get the permissions the target has (or would get from the umask), not mkstemp's 0600.
    """
    jobs = ([sidecar] if sidecar else []) + [(path, chunks)]
    temps: list[str] = []
    try:
        for target, parts in jobs:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), _mode_for(target))
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
        with _interrupts_held():
            _rename_all([(tmp, target) for tmp, (target, _) in zip(temps, jobs)])
        _sync_folder(folder)
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)


def _rename_all(renames: list[tuple[str, Path]]) -> None:
    """Rename each temporary file onto its target, in order. When a later rename fails, the
    earlier targets get their old files back (kept as hard links until the last rename), so
    an old model never meets a new external data file."""
    undo: list[tuple[Path, Path | None, bool]] = []  # target, its backup, whether it existed
    try:
        for k, (tmp, target) in enumerate(renames):
            if k < len(renames) - 1:
                undo.append((target, *_backup(target)))
            os.replace(tmp, target)
    except BaseException:
        for target, backup, existed in reversed(undo):
            if backup is not None:
                os.replace(backup, target)
            elif not existed:
                target.unlink(missing_ok=True)
        raise
    finally:
        for _, backup, _ in undo:
            if backup is not None:
                backup.unlink(missing_ok=True)


def _backup(target: Path) -> tuple[Path | None, bool]:
    """A hard link to ``target`` under a fresh name, and whether ``target`` exists (no link
    where it does not, or where the file system has no hard links)."""
    if not target.exists():
        return None, False
    backup = target.with_name(f".{target.name}.{secrets.token_hex(6)}.old")
    try:
        os.link(target, backup)
    except OSError:
        return None, True
    return backup, True


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Defer Ctrl-C (SIGINT) to the end of the block; only the main thread can."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, _frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None
                      else signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _mode_for(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _sync_folder(folder: Path) -> None:
    """Make the renames durable (best effort: not every platform can sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _all_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every tensor that may hold data: initializers and tensor attributes, at any depth."""
    holders = [*graphs(model.graph)]
    for function in model.functions:
        holders.append(function)
        holders.extend(g for node in function.node for sub in subgraphs(node) for g in graphs(sub))
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


def _one_line(err: BaseException, limit: int = 300) -> str:
    """The whole message on one line (the checker spreads one error over several)."""
    text = " ".join(str(err).replace("==> Context:", "-").split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
