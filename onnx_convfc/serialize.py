"""A model's protobuf bytes piece by piece, so saving never holds a copy of the whole model.

``model.SerializeToString()`` builds the whole file in memory, and sizing the model first (to
choose external data) serialised it once more. Here everything but the main graph's nodes and
initializers is serialised first, then the nodes and the initializers in ``graph`` fields of
their own: protobuf merges repeated occurrences of a message field, so a reader (onnx,
onnxruntime) gets one graph holding every node and initializer, in order. A ``Constant`` node
holding a large tensor, and each initializer, get a field each; a large tensor's ``raw_data``
is written as it is instead of being serialised with the rest (an initializer's after its
other fields, a ``Constant``'s in its place, as protobuf would write the node).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from google.protobuf.message import Message
from onnx import GraphProto, ModelProto, NodeProto, TensorProto

from .graphs import graphs
from .skeleton import LARGE_TENSOR_BYTES, copy_fields, data_nbytes, large_constant

GRAPH_FIELD = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER_FIELD = GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
NODE_FIELD = GraphProto.DESCRIPTOR.fields_by_name["node"].number
RAW_DATA_FIELD = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
LENGTH_DELIMITED = 2


class TooLarge(Exception):
    """The model's bytes passed the limit given to ``model_chunks``."""


class ExternalLayout:
    """Where each initializer's bytes go in an external data file.

    Two passes over the same tensors, in the same order: ``data_chunks`` yields the data file
    and notes each moved tensor's place, then ``model_chunks`` writes the model pointing there
    (write the data file first). Tensors with ``raw_data`` of at least ``min_bytes`` move.
    """

    def __init__(self, location: str, min_bytes: int, align: int) -> None:
        self.location = location
        self.min_bytes = min_bytes
        self.align = align
        self._places: list[tuple[int, int] | None] = []

    def data_chunks(self, model: ModelProto) -> Iterator[bytes]:
        offset = 0
        for tensor in _initializers(model.graph):
            # by type and dims first: reading ``raw_data`` copies it
            raw = tensor.raw_data if _raw_size(tensor) >= self.min_bytes else b""
            if len(raw) < self.min_bytes:
                self._places.append(None)
                continue
            padding = -offset % self.align
            yield b"\0" * padding
            self._places.append((offset + padding, len(raw)))
            offset += padding + len(raw)
            yield raw
            del raw  # before the next tensor's data is copied: one copy at a time

    def point(self, index: int, tensor: TensorProto) -> bool:
        """Make ``tensor`` (without its data) refer to the data file, if the tensor of this
        index was moved there; say whether it was."""
        place = self._places[index]
        if place is None:
            return False
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", place[0]),
                           ("length", place[1])):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        return True


def model_chunks(model: ModelProto, external: ExternalLayout | None = None,
                 limit: int | None = None) -> Iterator[bytes]:
    """The serialised ``model`` in pieces (``model`` is not changed). With ``external``, the
    tensors it moved refer to its data file. Raises ``TooLarge`` past ``limit`` bytes."""
    written = 0
    for chunk in _chunks(model, external):
        written += len(chunk)
        if limit is not None and written > limit:
            raise TooLarge(f"over {limit} bytes")
        yield chunk


def _chunks(model: ModelProto, external: ExternalLayout | None) -> Iterator[bytes]:
    head = ModelProto()
    copy_fields(model, head, skip=("graph",))
    own = model.graph.initializer
    if model.HasField("graph"):
        copy_fields(model.graph, head.graph, skip=("initializer", "node"))
    yield head.SerializeToString()
    nested = len(own)  # index of the next nested graph's tensor, as the data file has them
    for run in _node_runs(model.graph.node):
        if large_constant(run[0]) is not None:
            yield from _framed(GRAPH_FIELD, _framed(NODE_FIELD, _large_constant_parts(run[0])))
            continue
        piece = GraphProto()
        piece.node.extend(run)
        if external is not None:  # the piece's copies of nested graphs' tensors are ours
            for tensor in _initializers(piece):
                external.point(nested, tensor)
                nested += 1
        yield from _framed(GRAPH_FIELD, [piece.SerializeToString()])
    for k, tensor in enumerate(own):
        size = _raw_size(tensor)
        if external is not None and size >= external.min_bytes:
            meta = _without_raw_data(tensor)
            if external.point(k, meta):
                yield _initializer_field(meta.SerializeToString())
                continue
        if size < LARGE_TENSOR_BYTES:  # most initializers: one piece, one write
            yield _initializer_field(tensor.SerializeToString())
            continue
        parts = [_without_raw_data(tensor).SerializeToString(),
                 *_framed(RAW_DATA_FIELD, [tensor.raw_data])]
        yield from _framed(GRAPH_FIELD, _framed(INITIALIZER_FIELD, parts))
        del parts  # before the next tensor's data is copied: one copy at a time


def _node_runs(nodes) -> Iterator[list]:
    """The nodes in runs to serialise together: each ``Constant`` holding a large tensor
    alone, so no more than one weight is copied at a time."""
    run: list = []
    for node in nodes:
        if large_constant(node) is not None:
            if run:
                yield run
            yield [node]
            run = []
        else:
            run.append(node)
    if run:
        yield run


def _large_constant_parts(node: NodeProto) -> list[bytes]:
    """A ``Constant`` node holding a large tensor, bytes as its own serialisation has them,
    the tensor's ``raw_data`` written as it is: serialising the node whole took three times
    its size (protobuf's encode buffer grows by doubling, then is copied out)."""
    attr = node.attribute[0]
    tensor = attr.t
    if not tensor.HasField("raw_data"):
        return [node.SerializeToString()]
    data = _around(tensor, "raw_data", [tensor.raw_data])
    return _around(node, "attribute", _around(attr, "t", data))


def _around(message: Message, name: str, value: list[bytes]) -> list[bytes]:
    """``message`` serialised with its length-delimited field ``name`` (set once, its encoded
    value in ``value``) in its place: protobuf writes fields in the order of their numbers."""
    fields = message.DESCRIPTOR.fields
    number = message.DESCRIPTOR.fields_by_name[name].number
    before, after = type(message)(), type(message)()
    copy_fields(message, before, skip={fd.name for fd in fields if fd.number >= number})
    copy_fields(message, after, skip={fd.name for fd in fields if fd.number <= number})
    return [before.SerializeToString(), *_framed(number, value), after.SerializeToString()]


def _raw_size(tensor: TensorProto) -> float:
    """Bytes of the tensor's ``raw_data`` by its type and dims (without reading it): -1
    without ``raw_data``, infinite where its type does not tell."""
    if not tensor.HasField("raw_data"):
        return -1
    nbytes = data_nbytes(tensor)
    return math.inf if nbytes is None else nbytes


def _initializer_field(tensor: bytes) -> bytes:
    """A serialised initializer as a ``graph`` field of its own, in one piece (one write)."""
    return b"".join(_framed(GRAPH_FIELD, _framed(INITIALIZER_FIELD, [tensor])))


def _without_raw_data(tensor: TensorProto) -> TensorProto:
    meta = TensorProto()
    copy_fields(tensor, meta, skip=("raw_data",))
    return meta


def _framed(field: int, parts: list[bytes]) -> list[bytes]:
    """``parts`` as one length-delimited field: its key and length, then the parts."""
    size = sum(len(p) for p in parts)
    return [_varint(field << 3 | LENGTH_DELIMITED) + _varint(size), *parts]


def _varint(value: int) -> bytes:
    if value <= 0x7F:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _initializers(graph: GraphProto) -> Iterator[TensorProto]:
    """The initializers of ``graph``, then of the graphs nested in its nodes, depth first."""
    for each in graphs(graph):
        yield from each.initializer
