"""Emitting replacement nodes: deterministic names and deduplicated constants.

A lowering talks to an ``Emitter``: ``op`` appends a node, ``const`` stores an array. In a
graph, constants become initializers; in a model-local function (which has no initializers)
they become ``Constant`` nodes. Every name is ``<conv name>/convfc/<what>``, made unique
across the whole model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, helper, numpy_helper

from .options import RewriteOptions
from .skeleton import write_array

# Elements hashed per constant to find identical ones; smaller constants hash every element.
SAMPLE_ELEMENTS = 4096
# Samples up to this many bytes are keys themselves: hashing them costs more than comparing.
INLINE_KEY_BYTES = 64


class NameScope:
    """Hands out names that collide with nothing already in the model."""

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._taken = set(taken)

    def take(self, wanted: str) -> str:
        name, n = wanted, 1
        while name in self._taken:
            name = f"{wanted}_{n}"
            n += 1
        self._taken.add(name)
        return name


class ConstantPool:
    """Stores constants of one graph or function once each, keyed by content.

    In a graph (``holder``) each constant is written straight into its initializers; in a
    function (``holder`` None) it becomes a node of ``constant_nodes``. Identical constants are
    found by dtype, shape and a hash of their elements; a large constant hashes a strided
    sample only and a match is confirmed byte for byte (hashing every byte of every lowered
    weight cost more than writing it).
    """

    def __init__(self, names: NameScope, holder: GraphProto | None) -> None:
        self.names = names
        self.holder = holder
        self.constant_nodes: list[NodeProto] = []
        self.stored_bytes = 0  # of the constants stored, each once
        self._by_key: dict[tuple, list[tuple[str, TensorProto]]] = {}

    def add(self, wanted: str, array: np.ndarray) -> str:
        array = np.asarray(array)  # a transposed view stays one: it is copied once, when written
        step = max(1, array.size // SAMPLE_ELEMENTS)
        stored = self._by_key.setdefault((array.dtype.str, array.shape, _digest(array, step)), [])
        for name, tensor in stored:
            if step == 1 or _same_bytes(numpy_helper.to_array(tensor), array):
                return name
        name = self.names.take(wanted)
        if self.holder is not None:
            tensor = self.holder.initializer.add()
            write_array(tensor, array, name)
        else:
            node = helper.make_node("Constant", [], [name],
                                    name=self.names.take(wanted + "/Constant"),
                                    value=numpy_helper.from_array(array, name))
            self.constant_nodes.append(node)
            tensor = node.attribute[0].t
        stored.append((name, tensor))
        self.stored_bytes += array.nbytes
        return name


def _digest(array: np.ndarray, step: int) -> bytes:
    """The bytes of every ``step``-th element (C order), hashed unless they are few."""
    flat = array.reshape(-1) if array.flags.c_contiguous else array.flat  # flat: a copy
    sample = flat[::step].tobytes()
    return sample if len(sample) <= INLINE_KEY_BYTES else \
        hashlib.blake2b(sample, digest_size=16).digest()


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality (NaNs with the same bits are equal, -0.0 and 0.0 are not), compared
    through unsigned views: no copy, even of a transposed view."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.hasobject or a.dtype.itemsize not in (1, 2, 4, 8):
        return bool(np.array_equal(a, b))
    bits = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(a.view(bits), b.view(bits)))


class Emitter:
    """Builds the nodes that replace one conv; ``options`` carries the flags that shape them,
    ``opset`` says which signature an op whose inputs changed across opsets takes."""

    def __init__(self, prefix: str, pool: ConstantPool,
                 options: RewriteOptions | None = None, opset: int | None = None) -> None:
        self.prefix = f"{prefix}/convfc"
        self.pool = pool
        self.options = options or RewriteOptions()
        self.opset = opset  # the default domain's; None when unknown (opset-neutral ops only)
        self.nodes: list[NodeProto] = []
        self.const_bytes = 0  # of the constants this conv added to the model

    def const(self, what: str, array: np.ndarray) -> str:
        """Store ``array`` (shared with identical constants) and return its name."""
        before = self.pool.stored_bytes
        name = self.pool.add(f"{self.prefix}/{what}", array)
        self.const_bytes += self.pool.stored_bytes - before
        return name

    def ints(self, what: str, values: Sequence[int]) -> str:
        return self.const(what, np.asarray(values, dtype=np.int64))

    def declare(self, name: str, dtype: np.dtype, rank: int) -> None:
        """Record the dtype and rank of tensor ``name`` in the graph's value_info, for a
        tensor whose rank shape inference cannot tell (a Reshape to a run-time shape)."""
        if self.pool.holder is not None:
            self.pool.holder.value_info.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [None] * rank))

    def fresh(self, what: str) -> str:
        """A new name ``<conv>/convfc/<what>``, unique in the model, for a tensor or node."""
        return self.pool.names.take(f"{self.prefix}/{what}")

    def op(self, op_type: str, inputs: Sequence[str], what: str | None = None,
           output: str | None = None, **attrs) -> str:
        """Append one node and return the name of its (single) output."""
        label = what or op_type
        out = output or self.fresh(f"{label}_out")
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.fresh(label),
                                           **attrs))
        return out
