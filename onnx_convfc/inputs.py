"""Feeds for a model: seeded random data, user shapes and values, or real data from an .npz.

A symbolic dim gets, in this order: its value from ``--input-shape``, the value the same dim
name already took on another input, 1 when it looks like a batch dim, ``DEFAULT_DIM``
otherwise. Every dim filled by a default is named in ``FeedPlan.notes``.
"""

from __future__ import annotations

import argparse
import math
import os
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import ModelProto, ValueInfoProto, helper

from .io import InputError
from .options import parse_input_shape

DEFAULT_DIM = 32
# Most bytes of random data one run may draw: a declared shape can be far beyond memory.
MAX_RANDOM_BYTES = 4 * 2**30
INT_HIGH = 4  # random integers are drawn from [0, INT_HIGH): safe as indices, sizes, flags
BATCH_DIM_NAMES = ("n", "b", "bs", "batch", "batch_size", "batchsize", "batch_dim")


def parse_input_value(text: str) -> tuple[str, tuple[str, ...]]:
    """``NAME:16000`` or ``NAME:1,2,3`` -> ``("NAME", ("16000",))``; typed later per input."""
    name, sep, values = text.rpartition(":")
    if not sep or not name or not values:
        raise ValueError(f"expected NAME:V or NAME:V,V,..., got {text!r}")
    return name, tuple(v.strip() for v in values.split(","))


def argtype(parse: Callable) -> Callable:
    """Wrap a parser for argparse so its own message is the error line, not 'invalid value'."""

    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    wrapped.__name__ = parse.__name__
    return wrapped


def add_input_args(parser: argparse.ArgumentParser, *, input_shape: bool = True) -> None:
    """The "inputs and shapes" group shared by ``check``, ``rewrite --verify`` and ``bench``.

    ``input_shape=False`` leaves out ``--input-shape`` for parsers that already define it
    (``rewrite``); the value lands in the same ``input_shapes`` destination either way.
    """
    group = parser.add_argument_group(
        "inputs and shapes", None if input_shape else "--input-shape above sets these too")
    if input_shape:
        group.add_argument("--input-shape", dest="input_shapes", action="append", default=[],
                           type=argtype(parse_input_shape), metavar="NAME:DxD..",
                           help="fix the shape of a graph input, e.g. images:1x3x640x640 "
                                "(repeatable); other symbolic dims default to 1 for batch "
                                f"dims and {DEFAULT_DIM} otherwise")
    group.add_argument("--input-value", dest="input_values", action="append", default=[],
                       type=argtype(parse_input_value), metavar="NAME:V[,V..]",
                       help="pin a scalar or small input to these values, e.g. sr:16000 "
                            "(repeatable)")
    group.add_argument("--inputs", dest="inputs_npz", metavar="FILE.npz",
                       help="real input data: arrays keyed by input name (others stay random)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the random inputs (default: %(default)s)")


def input_kwargs(args: argparse.Namespace) -> dict:
    """The ``plan_feeds`` keywords set by ``add_input_args``."""
    return dict(seed=args.seed, input_shapes=tuple(args.input_shapes),
                input_values=tuple(args.input_values), inputs_npz=args.inputs_npz)


@dataclass(frozen=True)
class InputSpec:
    """One graph input as it will be fed."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    source: str  # "random", "npz" or "--input-value"
    defaults: str = ""  # the dims no option set, e.g. "batch=1, sequence=32"

    def describe(self, *, defaults: bool = False) -> str:
        """``X float32 1x3x32x32 (random)``; ``defaults`` adds the dims no option set."""
        dims = "x".join(map(str, self.shape)) or "scalar"
        how = f"{self.source}, defaults {self.defaults}" if defaults and self.defaults \
            else self.source
        return f"{self.name} {self.dtype} {dims} ({how})"


@dataclass
class FeedPlan:
    """What each input gets; ``feeds(run)`` draws run ``run``'s random data."""

    specs: list[InputSpec]
    fixed: dict[str, np.ndarray]
    seed: int
    notes: list[str]

    def feeds(self, run: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, run])
        return {s.name: self.fixed[s.name] if s.name in self.fixed else _random(rng, s)
                for s in self.specs}

    def empty_hint(self) -> str:
        """For an onnxruntime failure on inputs with no elements (a declared batch of 0),
        which some kernels and shape checks refuse; ``""`` when every input has elements."""
        empty = [f"{s.name} {_text(s.shape)}" for s in self.specs if 0 in s.shape]
        if not empty:
            return ""
        return f"; the inputs hold no elements ({', '.join(empty)}), which some ops cannot take"

    def failure_hint(self) -> str:
        """For a model onnxruntime cannot run at these inputs: what was fed, how to pin it."""
        return self.empty_hint() or (
            f"; inputs tried: {', '.join(s.describe(defaults=True) for s in self.specs)}; "
            "pin them with --input-shape NAME:DxD.., --input-value NAME:V[,V..] "
            "or --inputs FILE.npz")


def plan_feeds(model: ModelProto, *, seed: int = 0,
               input_shapes: Iterable[tuple[str, tuple[int, ...]]] = (),
               input_values: Iterable[tuple[str, tuple[str, ...]]] = (),
               inputs_npz: str | os.PathLike | None = None) -> FeedPlan:
    """Decide the dtype, shape and source of every graph input of ``model``.

    Raises:
        InputError: unknown input names, shapes that contradict the model, bad values.
    """
    graph_inputs = _graph_inputs(model)
    names = list(graph_inputs)
    shapes = dict(input_shapes)
    values = dict(input_values)
    arrays = _load_npz(inputs_npz) if inputs_npz is not None else {}
    for flag, given in (("--input-shape", shapes), ("--input-value", values),
                        (str(inputs_npz), arrays)):
        unknown = [n for n in given if n not in graph_inputs]
        if unknown:
            raise InputError(f"{flag}: the model has no input {', '.join(map(repr, unknown))} "
                             f"(inputs: {', '.join(names) or 'none'})")
    twice = sorted(set(values) & set(arrays))
    if twice:
        raise InputError(f"input {', '.join(map(repr, twice))}: given both by --input-value "
                         f"and in {inputs_npz}; keep one")
    dtypes = {n: _numpy_dtype(v) for n, v in graph_inputs.items()}
    declared = {n: _declared_dims(v) for n, v in graph_inputs.items()}

    fixed: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for name, array in arrays.items():
        fixed[name] = _npz_array(name, array, dtypes[name], declared[name], shapes.get(name))
        sources[name] = "npz"
    bound = _bind_dim_names(declared, {**shapes, **{n: a.shape for n, a in fixed.items()}})
    for name in shapes:
        _check_rank(name, shapes[name], declared[name], "--input-shape")

    notes: list[str] = []
    specs: list[InputSpec] = []
    for name in names:
        if name in values:
            fixed[name] = _pinned(name, values[name], dtypes[name], declared[name],
                                  shapes.get(name), bound)
            sources[name] = "--input-value"
        defaults = ""
        if name in fixed:
            shape = tuple(fixed[name].shape)
        elif name in shapes:
            shape = tuple(shapes[name])
        else:
            shape, defaults = _default_shape(name, declared[name], bound)
        if defaults:
            notes.append(f"input '{name}': {_text(shape)} with defaults {defaults} "
                         f"(set it with --input-shape {name}:{_text(shape)})")
        specs.append(InputSpec(name, dtypes[name], shape, sources.get(name, "random"),
                               defaults))
    _refuse_huge_random(specs, fixed)
    return FeedPlan(specs, fixed, seed, notes)


def _refuse_huge_random(specs: list[InputSpec], fixed: dict[str, np.ndarray]) -> None:
    drawn = [(s, math.prod(s.shape) * s.dtype.itemsize) for s in specs if s.name not in fixed]
    if sum(size for _, size in drawn) > MAX_RANDOM_BYTES:
        spec, size = max(drawn, key=lambda item: item[1])
        raise InputError(f"input '{spec.name}': random data of shape {_text(spec.shape)} "
                         f"would take {size} bytes (over {MAX_RANDOM_BYTES} in all); fix a "
                         f"smaller shape with --input-shape {spec.name}:DxD.. or give data "
                         "with --inputs FILE.npz")


def check_input_shapes(model: ModelProto,
                       input_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> None:
    """Refuse ``--input-shape`` values for the rewrite as ``plan_feeds`` does for parity: a
    name that is no graph input, a rank or a fixed dim the model contradicts (the rewritten
    model would hold constants for a shape its declared input cannot take).

    Raises:
        InputError: naming the input and what is wrong.
    """
    graph_inputs = _graph_inputs(model)
    for name, shape in input_shapes:
        if name not in graph_inputs:
            raise InputError(f"--input-shape: the model has no input '{name}' "
                             f"(inputs: {', '.join(graph_inputs) or 'none'})")
        _check_rank(name, shape, _declared_dims(graph_inputs[name]), "--input-shape")


def _graph_inputs(model: ModelProto) -> dict[str, ValueInfoProto]:
    """Graph inputs that need a feed (initializers listed as inputs have their value)."""
    initialized = {t.name for t in model.graph.initializer}
    return {v.name: v for v in model.graph.input if v.name not in initialized}


def _numpy_dtype(value: ValueInfoProto) -> np.dtype:
    if value.type.WhichOneof("value") != "tensor_type":
        raise InputError(f"input '{value.name}': only tensor inputs can be fed "
                         f"(this one is a {value.type.WhichOneof('value')})")
    elem = value.type.tensor_type.elem_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in "fiub":  # bfloat16, float8 and strings are not
        raise InputError(f"input '{value.name}': cannot make data of type "
                         f"{helper.tensor_dtype_to_string(elem)}; supply it with --inputs FILE.npz")
    return dtype


def _declared_dims(value: ValueInfoProto) -> tuple | None:
    """Declared dims (int, symbolic name, or None), or None when no shape is declared.

    A negative declared dim (exporters write -1 for "any size") counts as unknown; a declared
    0 is a size (an empty axis), which onnxruntime enforces like any other."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0
                 else (d.dim_param or None) for d in tensor.shape.dim)


def _check_rank(name: str, shape: tuple[int, ...], declared: tuple | None, flag: str) -> None:
    if declared is None:
        return
    if len(shape) != len(declared):
        raise InputError(f"input '{name}': {flag} gives rank {len(shape)} "
                         f"({_text(shape)}), the model declares rank {len(declared)} "
                         f"({_text(declared)})")
    for axis, (want, got) in enumerate(zip(declared, shape)):
        if isinstance(want, int) and want != got:
            raise InputError(f"input '{name}': {flag} gives {got} at axis {axis}, the model "
                             f"fixes it to {want} ({_text(declared)})")


def _bind_dim_names(declared: dict, known: dict) -> dict[str, int]:
    """Symbolic dim name -> the value it takes on an input whose shape the user set."""
    bound: dict[str, int] = {}
    for name, shape in known.items():
        dims = declared.get(name)
        if dims is None or len(dims) != len(shape):
            continue
        for want, got in zip(dims, shape):
            if isinstance(want, str):
                bound.setdefault(want, int(got))
    return bound


def _default_shape(name: str, declared: tuple | None,
                   bound: dict[str, int]) -> tuple[tuple[int, ...], str]:
    """The shape to feed, and the dims it took by default (``"batch=1, axis 2=32"``)."""
    if declared is None:
        raise InputError(f"input '{name}' declares no shape; give it with --input-shape "
                         f"{name}:DxD.. or --inputs FILE.npz")
    shape, guessed = [], []
    for axis, dim in enumerate(declared):
        if isinstance(dim, int):
            shape.append(dim)
        elif isinstance(dim, str) and dim in bound:
            shape.append(bound[dim])
        else:
            batch = (dim or "").lower() in BATCH_DIM_NAMES or (
                dim is None and axis == 0 and len(declared) > 1)
            value = 1 if batch else DEFAULT_DIM
            if isinstance(dim, str):
                bound[dim] = value
            shape.append(value)
            guessed.append(f"{dim or f'axis {axis}'}={value}")
    return tuple(shape), ", ".join(guessed)


def _pinned(name: str, texts: tuple[str, ...], dtype: np.dtype, declared: tuple | None,
            override: tuple[int, ...] | None, bound: dict[str, int]) -> np.ndarray:
    values = np.asarray([_typed(name, t, dtype) for t in texts], dtype=dtype)
    if override is not None:
        shape = tuple(override)
    elif declared is not None and len(declared) == 0:
        shape = ()
    elif declared is not None and len(declared) == 1 and not isinstance(declared[0], int):
        shape = (len(values),)
    else:
        shape, _ = _default_shape(name, declared, dict(bound))
    count = int(np.prod(shape, dtype=np.int64))
    if len(values) == count:
        return values.reshape(shape)
    if len(values) == 1:
        return np.full(shape, values[0], dtype=dtype)
    raise InputError(f"input '{name}': --input-value gives {len(values)} values, its shape "
                     f"{_text(shape) or 'scalar'} holds {count}")


def _typed(name: str, text: str, dtype: np.dtype):
    try:
        if dtype.kind == "b":
            if text.lower() not in ("0", "1", "true", "false"):
                raise ValueError(text)
            return text.lower() in ("1", "true")
        if dtype.kind == "f":
            return float(text)
        value = int(text)
        if not np.iinfo(dtype).min <= value <= np.iinfo(dtype).max:
            raise ValueError(text)
        return value
    except ValueError:
        raise InputError(f"input '{name}': --input-value {text!r} is not a valid {dtype}") \
            from None


def _load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive of named arrays")
        with data:
            arrays = {k: data[k] for k in data.files}
        broken = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
        if broken:
            raise ValueError(f"member {broken[0]!r} is not a .npy array")
        return arrays
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: not a readable .npz of input arrays ({err})") from None


def _npz_array(name: str, array: np.ndarray, dtype: np.dtype, declared: tuple | None,
               override: tuple[int, ...] | None) -> np.ndarray:
    if array.dtype != dtype:
        if not np.can_cast(array.dtype, dtype, "same_kind"):
            raise InputError(f"input '{name}': the .npz array is {array.dtype}, the model "
                             f"takes {dtype}")
        array = array.astype(dtype)
    _check_rank(name, array.shape, declared, ".npz array")
    if override is not None and tuple(override) != array.shape:
        raise InputError(f"input '{name}': --input-shape {_text(override)} contradicts the "
                         f".npz array's shape {_text(array.shape)}")
    return array


def _random(rng: np.random.Generator, spec: InputSpec) -> np.ndarray:
    kind = spec.dtype.kind
    if kind == "f":
        return rng.standard_normal(spec.shape, dtype=np.float32).astype(spec.dtype, copy=False)
    if kind == "b":
        return rng.random(spec.shape) < 0.5
    return rng.integers(0, INT_HIGH, size=spec.shape, dtype=spec.dtype)


def _text(shape: Iterable) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)
