"""Reading and writing models: clear one-line errors in, atomic writes out.

External data is read only from files inside the model's folder (a location that is absolute,
climbs out with ``..`` or leads out through a symlink is refused before anything is read), and
every byte range is checked against the file before it is read. Writes go to temporary files
in the destination folder that are renamed into place, the external data file first.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import onnx
from onnx import GraphProto, ModelProto, TensorProto, helper

from .graphs import STANDARD_DOMAINS, TENSOR_OPS, graphs, subgraphs
from .serialize import ExternalLayout, TooLarge, model_chunks
from .skeleton import DATA_FIELDS, data_nbytes, weightless_copy

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
        raise InputError(f"{path}: not a readable ONNX model ({first_line(err)})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes)")
    external = [t for t in _all_tensors(model) if t.data_location == TensorProto.EXTERNAL]
    _check_structure(model, str(path), external=bool(external))
    for tensor in external:
        _load_external(tensor, path)
    return LoadedModel(model, path, bool(external))


def initializer_bytes(model: ModelProto) -> int:
    """Bytes of the main graph's initializer data, read from field lengths: no serialising."""
    return sum(data_nbytes(t) or 0 for t in model.graph.initializer)


def save_model(model: ModelProto, path: str | os.PathLike, *, external_data: bool = False) -> None:
    """Write ``model`` to ``path`` atomically: temporary files in the same folder, renamed.

    Tensors go to ``<file name>.data`` beside the model when ``external_data`` is true (pass
    ``LoadedModel.external_data`` to keep the input's layout) or when the model would not fit
    in one protobuf. ``model`` is left as it was. A failed write leaves ``path`` untouched.
    """
    path = Path(path)
    folder = _folder(path)
    if not external_data and initializer_bytes(model) <= PROTOBUF_LIMIT:
        try:  # written a piece at a time (``serialize.py``): no copy of the whole model
            _write_atomically(path, folder, model_chunks(model, limit=PROTOBUF_LIMIT))
            return
        except TooLarge:
            pass
    layout = ExternalLayout(f"{path.name}.data", EXTERNAL_MIN_BYTES, EXTERNAL_ALIGN)
    _write_atomically(path, folder, model_chunks(model, layout),
                      (folder / layout.location, layout.data_chunks(model)))


class StagedSave:
    """Save a model where it can be checked before it replaces ``path``: a fresh folder beside
    ``path``, under the same file name, so that external data keeps its final location.

    ``commit`` moves the files onto ``path`` (external data first, as ``save_model`` does);
    leaving the ``with`` block removes the folder and whatever was not committed.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.target = Path(path)
        folder = _folder(self.target)
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".staged",
                                                dir=folder))
        except OSError as err:
            raise _cannot_write(path, err) from None
        self.path = self.folder / self.target.name

    def __enter__(self) -> StagedSave:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def commit(self) -> None:
        staged = sorted(self.folder.iterdir(), key=lambda p: p == self.path)  # the model last
        moves = [(p, self.target.with_name(p.name)) for p in staged]
        try:
            for source, target in moves:
                os.chmod(source, _mode_for(target))
            with _interrupts_held():
                _rename_all([(str(source), target) for source, target in moves])
            _sync_folder(self.target.parent)
        except OSError as err:
            raise _cannot_write(self.target, err) from None


def _cannot_write(path: str | os.PathLike, err: OSError) -> InputError:
    return InputError(f"{path}: cannot write ({err.strerror or err})")


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

    The checker serialises the model it is given, so it gets a weightless copy
    (``skeleton.weightless_copy``), and the large tensors left out get the checker's data
    checks here (``_check_data``): a third of the time and none of the memory of checking
    the whole model (light_vgg19 with random weights: 1.4 s and twice its size before).
    Two things onnxruntime accepts are let through: graph inputs and outputs that declare no
    shape (onnx-graphsurgeon writes them), and external data (the checker would look for it
    from the working directory); the copy hides them.

    Raises:
        InputError: with the checker's message, or one worded like it, on one line.
    """
    external = any(t.data_location == TensorProto.EXTERNAL for t in _all_tensors(model))
    _check_structure(model, where, external)


def _check_structure(model: ModelProto, where: str, external: bool) -> None:
    """``check_structure``, told whether ``model`` has external tensors to hide."""
    copy, store = weightless_copy(model)
    for placeholder, data in store.placeholders(copy.graph):
        _check_data(data, where)
        placeholder.dims[:] = [0]  # no elements: no data to check
    for graph in graphs(copy.graph):
        for value in (*graph.input, *graph.output):
            if value.type.HasField("tensor_type"):
                value.type.tensor_type.shape.SetInParent()
    for tensor in _all_tensors(copy) if external else ():
        if tensor.data_location == TensorProto.EXTERNAL:
            tensor.ClearField("data_location")
            del tensor.external_data[:]
            tensor.dims[:] = [0]
    try:
        onnx.checker.check_model(copy)
    except Exception as err:  # noqa: BLE001 - ValidationError, and protobuf's own errors
        raise InputError(f"{where}: not a valid ONNX model ({_one_line(err)})") from None


def _check_data(tensor: TensorProto, where: str) -> None:
    """What the checker asks of a tensor's data: dims >= 0, one data field, the one for its
    type, holding at least what the shape needs. Only ``raw_data`` is read (its length), one
    tensor at a time."""
    def refuse(problem: str) -> InputError:
        return InputError(f"{where}: not a valid ONNX model (tensor '{tensor.name}': {problem})")

    if any(d < 0 for d in tensor.dims):
        raise refuse(f"negative dimension in {list(tensor.dims)}")
    present = [f for f in DATA_FIELDS
               if (tensor.HasField(f) if f == "raw_data" else len(getattr(tensor, f)))]
    if len(present) != 1:
        raise refuse(f"should hold its data in one field, holds it in {len(present)}")
    field = present[0]
    if field == "raw_data":
        have, need = len(tensor.raw_data), data_nbytes(tensor)
    else:
        expected = helper.tensor_dtype_to_field(tensor.data_type)
        if field != expected:
            raise refuse(f"data of type {helper.tensor_dtype_to_string(tensor.data_type)} "
                         f"belongs in '{expected}', not '{field}'")
        complex_type = tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128)
        have, need = len(getattr(tensor, field)), math.prod(tensor.dims) * (1 + complex_type)
    if have < need:
        raise refuse(f"{field} holds {have}, too small for the declared shape and type "
                     f"({need} required)")


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
                    del part  # a tensor's bytes go before the next tensor's are copied
                f.flush()
                os.fsync(f.fileno())
        with _interrupts_held():
            _rename_all([(tmp, target) for tmp, (target, _) in zip(temps, jobs)])
        _sync_folder(folder)
    except OSError as err:
        raise _cannot_write(path, err) from None
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
    """Every tensor that may hold data: initializers and tensor attributes, at any depth
    (``graphs.TENSOR_OPS`` says which nodes of the standard domain may have the latter)."""
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
            if node.op_type not in TENSOR_OPS and node.domain in STANDARD_DOMAINS:
                continue
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


def model_of(given: ModelProto | str | os.PathLike) -> ModelProto:
    """``given`` itself when it is a model, else the model loaded from that path."""
    return given if isinstance(given, ModelProto) else load_model(given)


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type's name when the message is empty."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
