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
from onnx import NodeProto, TensorProto, helper, numpy_helper

from .options import RewriteOptions


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
    """Stores constants of one graph or function once each, keyed by content."""

    def __init__(self, names: NameScope, in_function: bool) -> None:
        self.names = names
        self.in_function = in_function
        self.initializers: list[TensorProto] = []
        self.constant_nodes: list[NodeProto] = []
        self._by_content: dict[tuple, str] = {}

    def add(self, wanted: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        digest = hashlib.blake2b(array.tobytes(), digest_size=16).digest()
        key = (array.dtype.str, array.shape, digest)
        if key in self._by_content:
            return self._by_content[key]
        name = self.names.take(wanted)
        tensor = numpy_helper.from_array(array, name)
        if self.in_function:
            self.constant_nodes.append(
                helper.make_node("Constant", [], [name], name=self.names.take(wanted + "/Constant"),
                                 value=tensor)
            )
        else:
            self.initializers.append(tensor)
        self._by_content[key] = name
        return name


class Emitter:
    """Builds the nodes that replace one conv; ``options`` carries the flags that shape them."""

    def __init__(self, prefix: str, pool: ConstantPool,
                 options: RewriteOptions | None = None) -> None:
        self.prefix = f"{prefix}/convfc"
        self.pool = pool
        self.options = options or RewriteOptions()
        self.nodes: list[NodeProto] = []
        self.const_bytes = 0

    def const(self, what: str, array: np.ndarray) -> str:
        """Store ``array`` (shared with identical constants) and return its name."""
        self.const_bytes += array.nbytes
        return self.pool.add(f"{self.prefix}/{what}", array)

    def ints(self, what: str, values: Sequence[int]) -> str:
        return self.const(what, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: Sequence[str], what: str | None = None,
           output: str | None = None, **attrs) -> str:
        """Append one node and return the name of its (single) output."""
        label = what or op_type
        out = output or self.pool.names.take(f"{self.prefix}/{label}_out")
        self.nodes.append(helper.make_node(
            op_type, list(inputs), [out], name=self.pool.names.take(f"{self.prefix}/{label}"),
            **attrs,
        ))
        return out
