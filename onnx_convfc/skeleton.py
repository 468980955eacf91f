"""A model without the bytes of its large initializers, and where those bytes are.

Preparing, shape inference and planning read only small constants (shapes, axes, scales);
only the lowerings read weights. Carrying the weights through those steps (the opset
converter and shape inference each serialise the whole model) cost several times a plain
load and save, so the rewrite works on a *skeleton*: the model with each large initializer
and ``Constant`` value of the main graph kept as a placeholder (name, type and dims, no data).
A ``TensorStore``
says where each placeholder's data is: a tensor of the caller's model (read, never copied
whole or modified) or an array computed while preparing. ``TensorStore.fill`` writes the data
into the placeholders the result still has, one tensor at a time.

Why not delete the replaced weights from a full copy instead: protobuf (upb) gives memory back
only when a whole message is freed, so a tensor deleted from a model, or a ``raw_data``
overwritten, keeps its bytes until the model goes. Weights that the rewrite replaces are
better never copied into the result.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Collection, Iterator
from typing import Union

import numpy as np
from google.protobuf.message import Message
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

# The default ONNX domain, by both of its names.
STANDARD_DOMAINS = ("", "ai.onnx")
# Initializers at least this large (by their type and dims) are placeholders in a skeleton.
LARGE_TENSOR_BYTES = 4096
DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data",
               "double_data", "uint64_data")
# Element types stored packed (several elements per byte): their size is not itemsize * count.
PACKED_TYPES = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1",
                                                  "FLOAT6E2M3", "FLOAT6E3M2")
                if hasattr(TensorProto, n)}

Constant = Union[TensorProto, np.ndarray]


def data_nbytes(tensor: TensorProto) -> int | None:
    """Bytes of the tensor's data by its type and dims (without reading it), or ``None``
    where they cannot be told (strings, packed types, unknown types)."""
    itemsize = _itemsize(tensor.data_type)
    return None if itemsize is None else math.prod(tensor.dims) * itemsize


@functools.cache
def _itemsize(data_type: int) -> int | None:
    if data_type in PACKED_TYPES or data_type == TensorProto.STRING:
        return None
    try:
        return helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def copy_fields(src: Message, dst: Message, skip: Collection[str] = ()) -> None:
    """Copy the set fields of ``src`` into ``dst``, except those named in ``skip``.

    A skipped field is not even read: reading a bytes field (``raw_data``) copies it.
    """
    for name, repeated in _fields(type(src)):
        if name in skip:
            continue
        if repeated:
            values = getattr(src, name)
            if values:
                getattr(dst, name).extend(values)
        elif src.HasField(name):
            value = getattr(src, name)
            if isinstance(value, Message):
                getattr(dst, name).CopyFrom(value)
            else:
                setattr(dst, name, value)


@functools.cache
def _fields(message_type: type) -> tuple[tuple[str, bool], ...]:
    """(name, whether repeated) of each field of a message type."""
    empty = message_type()
    return tuple((fd.name, hasattr(getattr(empty, fd.name), "extend"))
                 for fd in message_type.DESCRIPTOR.fields)


def write_array(tensor: TensorProto, array: np.ndarray, name: str) -> None:
    """Make the empty ``tensor`` hold ``array``. The bytes are copied twice (``tobytes``, then
    into the message), where ``numpy_helper.from_array`` and appending its result take three."""
    if array.dtype.kind in "biuf" and array.dtype.isnative and sys.byteorder == "little":
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.raw_data = array.tobytes()  # C order, one copy even from a transposed view
    else:  # strings, ml_dtypes' custom types, big-endian: onnx knows their encodings
        tensor.CopyFrom(numpy_helper.from_array(array, name))


def placeholder(graph: GraphProto, name: str, array: np.ndarray) -> None:
    """Append an initializer of ``array``'s type and shape, without its data."""
    tensor = graph.initializer.add()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)


class TensorStore:
    """Placeholder name -> its data: a ``TensorProto`` held elsewhere, or an array."""

    def __init__(self) -> None:
        self._data: dict[str, Constant] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def keep(self, name: str, data: Constant) -> None:
        self._data[name] = data

    def get(self, name: str, default=None):
        return self._data.get(name, default)

    def forget(self, name: str) -> None:
        """Drop the data of a placeholder nothing reads any more (frees a computed array)."""
        self._data.pop(name, None)

    def fill(self, graph: GraphProto) -> None:
        """Write the data into ``graph``'s placeholders, one tensor at a time."""
        for name, tensor in _constant_tensors(graph):
            data = self._data.pop(name, None)
            if isinstance(data, TensorProto):
                tensor.CopyFrom(data)
            elif data is not None:
                own_name = tensor.name
                tensor.Clear()
                write_array(tensor, data, own_name)

    def placeholders(self, graph: GraphProto) -> Iterator[tuple[TensorProto, Constant]]:
        """(placeholder, its data) for each of ``graph``'s placeholders the store holds."""
        for name, tensor in _constant_tensors(graph):
            if name in self._data:
                yield tensor, self._data[name]

    def missing(self, graph: GraphProto) -> set[str]:
        """Names whose placeholder ``graph`` no longer has."""
        return set(self._data) - {name for name, _ in _constant_tensors(graph)}


def weightless_copy(model: ModelProto) -> tuple[ModelProto, TensorStore]:
    """A copy of ``model`` whose main graph's large initializers and ``Constant`` values are
    placeholders, and the store that says where their data is (``model``'s own tensors, not
    copied). ``Constant`` nodes count: some exporters (PaddlePaddle's) put every weight in one.
    """
    copy, store = ModelProto(), TensorStore()
    copy_fields(model, copy, skip=("graph",))
    if not model.HasField("graph"):
        return copy, store
    graph = model.graph
    copy_fields(graph, copy.graph, skip=("initializer", "node"))
    small: list[TensorProto] = []  # copied a run at a time: one call, not one per tensor
    for tensor in graph.initializer:
        if _is_large(tensor):
            copy.graph.initializer.extend(small)
            small.clear()
            copy_fields(tensor, copy.graph.initializer.add(), skip=DATA_FIELDS)
            store.keep(tensor.name, tensor)
        else:
            small.append(tensor)
    copy.graph.initializer.extend(small)
    done = 0
    for k, node in enumerate(graph.node):
        value = large_constant(node)
        if value is None:
            continue
        copy.graph.node.extend(graph.node[done:k])  # the nodes in between, in one call
        copy_fields(node, copy.graph.node.add(), skip=("attribute",))
        attr = copy.graph.node[-1].attribute.add()
        copy_fields(node.attribute[0], attr, skip=("t",))
        copy_fields(value, attr.t, skip=DATA_FIELDS)
        store.keep(node.output[0], value)
        done = k + 1
    copy.graph.node.extend(graph.node[done:])
    return copy, store


def large_constant(node: NodeProto) -> TensorProto | None:
    """The value of a ``Constant`` node that holds a large tensor, else ``None``."""
    if node.op_type != "Constant" or node.domain not in STANDARD_DOMAINS \
            or len(node.attribute) != 1 or len(node.output) != 1:
        return None
    attr = node.attribute[0]
    return attr.t if attr.name == "value" and attr.HasField("t") and _is_large(attr.t) else None


def _constant_tensors(graph: GraphProto) -> Iterator[tuple[str, TensorProto]]:
    """(name, tensor) of the graph's initializers and single-tensor ``Constant`` nodes."""
    for tensor in graph.initializer:
        yield tensor.name, tensor
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and len(node.output) == 1 \
                and node.attribute[0].HasField("t"):
            yield node.output[0], node.attribute[0].t


def _is_large(tensor: TensorProto) -> bool:
    nbytes = data_nbytes(tensor)
    return nbytes is not None and nbytes >= LARGE_TENSOR_BYTES \
        and tensor.data_location != TensorProto.EXTERNAL and not tensor.HasField("segment")
