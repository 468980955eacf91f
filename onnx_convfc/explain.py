"""``explain``: the dense (fully connected) matrix of a conv, its size and where it comes from.

For a fixed input shape a conv is ``y = x.reshape(N, -1) @ B + b`` with ``B`` of shape
``[C*prod(in), M*prod(out)]``. This module finds the convs of a model (every op of the conv
family, ``families.py``), states ``B``'s shape, bytes, non-zeros and density from the geometry
alone, and on request builds ``B`` to draw its structure (PNG, needs the ``plot`` extra) or to
export it (``.npz``). A ConvTranspose's ``B`` is the transpose of its adjoint conv's
(``lowering/convtranspose_dense.py``); the integer ops have no dense form and are listed only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from .conv import ConvSpec, SpecError, conv_spec
from .convtranspose import ConvTransposeSpec
from .families import FAMILIES, is_conv
from .graphs import all_nodes, constant_array, constants, inferred_shapes, scoped_graphs
from .inputs import check_input_shapes
from .lowering import convtranspose_dense
from .lowering.dense import matrix_shape
from .lowering.weights import dense_matrix
from .options import RewriteOptions
from .prepare import prepare
from .report import size_text

MAX_PIXELS = 1024  # longest side of the PNG; larger matrices are max-pooled down to it
MAX_GRID_LINES = 32  # channel-block separators drawn only up to this many channels
NOT_STATIC = "spatial size is not static"
NO_DENSE = "no dense form"
PLOT_HINT = "pip install 'onnx-convfc[plot]'"


class ExplainError(ValueError):
    """The request cannot be answered; the message is one line meant for the user."""


@dataclass(frozen=True)
class ConvEntry:
    """One conv of the model: its geometry and weight, or why they are not known.

    ``spec`` is a ``ConvTransposeSpec`` for a ConvTranspose, a ``ConvSpec`` otherwise (the
    integer ops' geometry, which is Conv's).
    """

    node: str
    scope: str
    spec: ConvSpec | ConvTransposeSpec | None
    weight: np.ndarray | None
    problem: str | None
    op_type: str


@dataclass(frozen=True)
class DenseSize:
    """Size and sparsity of ``B``, derived from the geometry without building it.

    ``axis_pairs[d]`` counts the (kernel offset, output position) pairs of axis ``d`` whose
    input lies inside the unpadded input; their product is the number of in-bounds taps
    summed over all output positions, since each axis decides independently. ``spec`` is the
    conv whose matrix ``B`` is, or (``transposed``, for a ConvTranspose) whose transpose.
    """

    spec: ConvSpec
    itemsize: int
    axis_pairs: tuple[int, ...]
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = matrix_shape(self.spec)
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def bytes(self) -> int:
        rows, cols = self.shape
        return rows * cols * self.itemsize

    @property
    def nnz(self) -> int:
        """M * C/g * in-bounds pairs: each pair carries one [C/g, M/g] block per group."""
        return self.spec.out_channels * self.spec.in_per_group * math.prod(self.axis_pairs)

    @property
    def density(self) -> float:
        rows, cols = self.shape
        return self.nnz / (rows * cols)


def explain_model(model: ModelProto, options: RewriteOptions, console, node: str | None = None,
                  png: str | os.PathLike | None = None,
                  npz: str | os.PathLike | None = None) -> None:
    """The ``explain`` verb: list the convs, or explain one and draw or export its matrix.

    Raises:
        ExplainError: unknown node, unusable conv, missing plot extra, matrix over budget.
    """
    if (png or npz) and not node:
        raise ExplainError("--png and --npz show one conv: add --node NAME")
    if png:
        require_plotting()
    check_input_shapes(model, options.input_shapes)
    entries = find_convs(model, options)
    if node is None:
        render_listing(entries, options.max_dense_bytes, console)
        return
    entry = pick(entries, node)
    for line in describe(entry, options.max_dense_bytes):
        console.print(line)
    if not (png or npz):
        return
    matrix = build_matrix(entry, options.max_dense_bytes)
    console.print(f"built B: {np.count_nonzero(matrix)} non-zero values "
                  "(fewer than the non-zeros above only where a weight is exactly 0)")
    if png:
        write_png(entry, matrix, png)
        console.print(f"wrote {png}")
    if npz:
        console.print(f"wrote {npz}: {write_npz(matrix, npz)}")


def render_listing(entries: list[ConvEntry], max_bytes: int, console) -> None:
    """A table of every conv's dense matrix on a ``rich`` console."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("conv", "geometry", "B shape", "bytes", "nnz", "density", "dense"):
        table.add_column(col, no_wrap=col == "conv",
                         justify="right" if col in ("bytes", "nnz", "density") else "left")
    for row in listing_rows(entries, max_bytes):
        table.add_row(*row)
    console.print(table)
    console.print(f"{len(entries)} conv(s); 'too big': over --max-dense-bytes "
                  f"{size_text(max_bytes)}; 'dynamic': fix the input with --input-shape; "
                  "explain one with --node NAME")


def dense_size(spec: ConvSpec | ConvTransposeSpec, itemsize: int) -> DenseSize:
    """From the geometry alone: nothing as large as the matrix (or one axis of it) is built."""
    transposed = isinstance(spec, ConvTransposeSpec)
    if transposed:
        spec = convtranspose_dense.adjoint(spec)
    r = spec.rank
    pairs = tuple(axis_pairs(k, d, s, p, size, out) for k, d, s, p, size, out in zip(
        spec.kernel, spec.dilations, spec.strides, spec.pads[:r], spec.input_spatial,
        spec.output_spatial()))
    return DenseSize(spec, itemsize, pairs, transposed)


def axis_pairs(kernel: int, dilation: int, stride: int, pad: int, size: int, out: int) -> int:
    """How many (kernel offset ``k``, output position ``o``) pairs of one axis read inside
    the input: ``0 <= o*stride + k*dilation - pad < size``, counted per offset in closed form.

    Python ints where the numbers could overflow int64 (declared dims can be anything).
    """
    big = max(pad, size, out * stride, kernel * dilation) >= 2**60
    k = np.arange(kernel, dtype=object if big else np.int64)
    low = pad - k * dilation  # o*stride must lie in [low, low + size - 1]
    first = np.maximum(0, -(-low // stride))
    last = np.minimum(out - 1, (low + size - 1) // stride)
    return int(np.maximum(0, last - first + 1).sum())


def find_convs(model: ModelProto, options: RewriteOptions) -> list[ConvEntry]:
    """Every conv-family node of the main graph and of If/Loop/Scan bodies, after
    ``prepare``."""
    prepared = prepare(model)  # weightless: its weights stay in the store
    model = prepared.model
    inputs = {i for n in all_nodes(model) if is_conv(n) for i in n.input}
    shapes = inferred_shapes(model, options.input_shapes, weightless=True, names=inputs)
    consts: dict = constants(model.graph, prepared.store)
    for graph, _scope in scoped_graphs(model.graph):
        if graph is not model.graph:  # nested graphs keep their own data
            consts.update(constants(graph))
    entries = []
    for graph, scope in scoped_graphs(model.graph):
        for node in graph.node:
            if is_conv(node):
                entries.append(_entry(node, scope, consts, shapes))
    return entries


def pick(entries: list[ConvEntry], name: str) -> ConvEntry:
    for entry in entries:
        if entry.node == name:
            return entry
    names = ", ".join(e.node for e in entries) or "none"
    raise ExplainError(f"no conv named {name!r}; the model's convs: {names}")


def describe(entry: ConvEntry, max_bytes: int) -> list[str]:
    """The lines that explain one conv's dense matrix from its geometry."""
    spec = _usable(entry)
    size = dense_size(spec, entry.weight.dtype.itemsize)
    lines = _shape_lines(entry, spec, size, max_bytes)
    if size.transposed:
        return lines + _adjoint_lines(spec, size)
    return lines + _sparsity_lines(spec, size)


def _shape_lines(entry: ConvEntry, spec: ConvSpec | ConvTransposeSpec, size: DenseSize,
                 max_bytes: int) -> list[str]:
    """Where ``B``'s shape and bytes come from: the same for every op with a dense form."""
    rows, cols = size.shape
    ins, outs = list(spec.input_spatial), list(spec.output_spatial())
    in_names, out_names = _axis_names(spec.rank, ""), _axis_names(spec.rank, "O")
    dtype = entry.weight.dtype.name
    budget = _dense_lowering(entry).over_budget(spec, size.itemsize, max_bytes)
    return [
        f"{entry.node}: {spec.short()}" + ("" if entry.scope == "main" else f" [{entry.scope}]"),
        f"input [N, {', '.join(map(str, [spec.in_channels, *ins]))}] -> "
        f"output [N, {', '.join(map(str, [spec.out_channels, *outs]))}]: "
        "y = x.reshape(N, -1) @ B + b",
        f"B shape     [{rows}, {cols}]",
        f"  rows      C*{'*'.join(in_names)} = {_product([spec.in_channels, *ins])}, "
        "one per input value",
        f"  columns   M*{'*'.join(out_names)} = {_product([spec.out_channels, *outs])}, "
        "one per output value",
        f"bytes dense {rows}*{cols}*{size.itemsize} B ({dtype}) = {size.bytes} B "
        f"({size_text(size.bytes)}); "
        + (budget or f"fits --max-dense-bytes {size_text(max_bytes)}"),
    ]


def _sparsity_lines(spec: ConvSpec, size: DenseSize) -> list[str]:
    """A Conv's non-zeros, factored per axis, its density and its block structure."""
    rows, cols = size.shape
    outs = list(spec.output_spatial())
    out_names = _axis_names(spec.rank, "O")
    positions = math.prod(outs)
    pairs = math.prod(size.axis_pairs)
    lines = [
        f"non-zeros   M * C/g * in-bounds taps summed over output positions = "
        f"{spec.out_channels} * {spec.in_per_group} * {pairs} = {size.nnz}",
        "  the in-bounds taps factor per axis (outputs x taps, minus taps in the padding):",
    ]
    for d, kept in enumerate(size.axis_pairs):
        total = outs[d] * spec.kernel[d]
        lines.append(f"    {out_names[d]}: {outs[d]} outputs x {spec.kernel[d]} taps = {total}, "
                     f"{total - kept} in padding -> {kept}")
    lines += [
        f"  {pairs} = {positions} output positions x {pairs / positions:.2f} in-bounds taps "
        f"on average (of {spec.taps})",
        f"density     {size.nnz} / ({rows}*{cols}) = {size.density:.4%}",
        f"structure   {_structure(spec)}",
    ]
    return lines


def _adjoint_lines(spec: ConvTransposeSpec, size: DenseSize) -> list[str]:
    """A ConvTranspose's non-zeros and density, through its adjoint conv."""
    rows, cols = size.shape
    adjoint = size.spec
    return [
        f"adjoint     B is the transpose of the matrix of the conv [M, {_dims(adjoint)}] -> "
        f"[C, {_dims(spec)}] with the same weight, strides, dilations and begin pads",
        f"non-zeros   C * M/g * in-bounds taps of that conv summed over its output positions = "
        f"{spec.in_channels} * {spec.out_per_group} * {math.prod(size.axis_pairs)} = "
        f"{size.nnz}",
        f"density     {size.nnz} / ({rows}*{cols}) = {size.density:.4%}",
    ]


def _dims(spec: ConvSpec | ConvTransposeSpec) -> str:
    return "x".join(map(str, spec.input_spatial))


def listing_rows(entries: list[ConvEntry], max_bytes: int) -> list[tuple[str, ...]]:
    """One row per conv: node, geometry, B's shape, bytes, non-zeros, density, verdict."""
    rows = []
    for entry in entries:
        where = entry.node if entry.scope == "main" else f"{entry.node} [{entry.scope}]"
        if entry.problem:
            geometry = entry.spec.short() if entry.spec else "?"
            label = "dynamic" if entry.problem == NOT_STATIC else entry.problem.split(":")[0]
            rows.append((where, geometry, "-", "-", "-", "-", label))
            continue
        spec = entry.spec
        size = dense_size(spec, entry.weight.dtype.itemsize)
        verdict = "too big" if size.bytes > max_bytes else "fits"
        rows.append((where, spec.short(), "x".join(map(str, size.shape)), size_text(size.bytes),
                     str(size.nnz), f"{size.density:.2%}", verdict))
    return rows


def build_matrix(entry: ConvEntry, max_bytes: int) -> np.ndarray:
    """``B`` itself, refused above ``max_bytes`` so a request cannot exhaust memory."""
    spec = _usable(entry)
    refusal = _dense_lowering(entry).over_budget(spec, entry.weight.dtype.itemsize, max_bytes)
    if refusal:
        raise ExplainError(f"conv '{entry.node}': {refusal}; raise it to build this matrix")
    if isinstance(spec, ConvTransposeSpec):
        return convtranspose_dense.matrix(entry.weight, spec)
    return dense_matrix(entry.weight, spec)


def require_plotting() -> None:
    """Fail early, before any work, when the ``plot`` extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ExplainError(f"--png needs matplotlib, which is not installed: {PLOT_HINT}") from None


def pooled_magnitude(matrix: np.ndarray, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, int]:
    """Max ``|value|`` over ``f x f`` blocks, ``f`` the smallest factor that fits ``max_pixels``.

    Returns the pooled image and ``f``. Ragged last blocks are pooled as they are.
    """
    factor = max(1, -(-max(matrix.shape) // max_pixels))
    if factor == 1:
        return np.abs(matrix), 1
    starts = [np.arange(0, n, factor) for n in matrix.shape]
    high = np.maximum.reduceat(np.maximum.reduceat(matrix, starts[0], axis=0), starts[1], axis=1)
    low = np.minimum.reduceat(np.minimum.reduceat(matrix, starts[0], axis=0), starts[1], axis=1)
    return np.maximum(high, -low), factor


def write_png(entry: ConvEntry, matrix: np.ndarray, path: str | os.PathLike) -> None:
    """Draw ``B``'s structure: zero entries white, the rest coloured by ``|weight|``."""
    require_plotting()
    from matplotlib.figure import Figure

    spec = _usable(entry)
    image, factor = pooled_magnitude(matrix)
    size = dense_size(spec, matrix.itemsize)
    height, width = image.shape
    fig = Figure(figsize=_figure_size(height / width), dpi=120)
    ax = fig.add_subplot()
    shown = ax.imshow(np.ma.masked_equal(image, 0), cmap="viridis", interpolation="nearest",
                      aspect="equal", extent=(0, matrix.shape[1], matrix.shape[0], 0))
    ax.set_facecolor("white")
    _channel_grid(ax, spec, matrix.shape)
    scale = "" if factor == 1 else f", each pixel the max over {factor}x{factor} entries"
    ax.set_title(f"{entry.node}: {spec.short()}\nB [{matrix.shape[0]} x {matrix.shape[1]}], "
                 f"{size.nnz} non-zeros ({size.density:.2%}){scale}", fontsize=9)
    outs = ", ".join(n.lower() for n in _axis_names(spec.rank, "O"))
    ins = ", ".join(n.lower() for n in _axis_names(spec.rank, ""))
    ax.set_xlabel(f"column = output value (m, {outs})")
    ax.set_ylabel(f"row = input value (c, {ins})")
    fig.colorbar(shown, ax=ax, label="|weight|", fraction=0.03, pad=0.02)
    fig.tight_layout()
    _save(path, lambda f: fig.savefig(f, format="png"))


def write_npz(matrix: np.ndarray, path: str | os.PathLike) -> str:
    """Export ``B``: scipy.sparse CSR when scipy is installed, dense otherwise.

    Returns how to load the file back.
    """
    try:
        import scipy.sparse
    except ImportError:
        _save(path, lambda f: np.savez_compressed(f, matrix=matrix))
        return f"dense array (scipy not installed): np.load({str(path)!r})['matrix']"
    _save(path, lambda f: scipy.sparse.save_npz(f, scipy.sparse.csr_matrix(matrix)))
    return f"scipy.sparse CSR: scipy.sparse.load_npz({str(path)!r})"


def _save(path: str | os.PathLike, write) -> None:
    try:
        with open(path, "wb") as f:
            write(f)
    except OSError as err:
        raise ExplainError(f"{path}: cannot write ({err.strerror or err})") from None


def _entry(node, scope: str, consts: dict, shapes: dict) -> ConvEntry:
    name, op_type = node.name or node.output[0], node.op_type
    family = FAMILIES[op_type]
    index = family.weight
    weight = constant_array(node.input[index], consts) if len(node.input) > index else None
    if weight is None:
        return ConvEntry(name, scope, None, None, "weight is not constant", op_type)
    input_shape = shapes.get(node.input[0])
    try:  # the integer ops carry Conv's attributes: their geometry is a ConvSpec
        spec = family.build(node, name, weight.shape, input_shape, {}) \
            if not family.params else conv_spec(node, weight.shape, input_shape)
    except SpecError as err:
        return ConvEntry(name, scope, None, weight, f"invalid conv: {err}", op_type)
    if "dense" not in family.lowerings:
        return ConvEntry(name, scope, spec, weight, f"{NO_DENSE}: {op_type} has no dense "
                         "matrix (only Conv and ConvTranspose have one)", op_type)
    return ConvEntry(name, scope, spec, weight, None if spec.is_static else NOT_STATIC, op_type)


def _dense_lowering(entry: ConvEntry):
    """The op's ``dense`` lowering module (``over_budget`` and the matrix it builds)."""
    return FAMILIES[entry.op_type].lowerings["dense"]


def _usable(entry: ConvEntry) -> ConvSpec:
    if entry.problem:
        hint = "; fix it with --input-shape NAME:DxDx.." if entry.problem == NOT_STATIC else ""
        raise ExplainError(f"conv '{entry.node}': {entry.problem}{hint}")
    return entry.spec


def _axis_names(rank: int, prefix: str) -> list[str]:
    base = {1: ["W"], 2: ["H", "W"], 3: ["D", "H", "W"]}.get(rank)
    names = base or [f"S{d + 1}" for d in range(rank)]
    return [f"{prefix}{n}" for n in names]


def _structure(spec: ConvSpec) -> str:
    text = (f"{spec.in_channels} x {spec.out_channels} channel blocks, each "
            f"[{math.prod(spec.input_spatial)}, {math.prod(spec.output_spatial())}]")
    if spec.group > 1:
        text += (f"; block-diagonal over {spec.group} groups, so only "
                 f"{spec.in_per_group} x {spec.out_per_group} blocks per group are non-zero")
    kind = "block-Toeplitz" if all(s == 1 for s in spec.strides) else "strided block-banded"
    return text + f"; a non-zero block is {spec.rank}-level {kind} (one band level per axis)"


def _figure_size(aspect: float) -> tuple[float, float]:
    """Inches for an image ``aspect`` (height / width) times taller than wide, plus margins."""
    if aspect <= 1:
        return 10.0, max(3.0, 8.5 * aspect + 1.5)
    return max(4.0, 8.5 / aspect + 2.5), 10.0


def _channel_grid(ax, spec: ConvSpec, shape: tuple[int, int]) -> None:
    """Thin lines between channel blocks, when there are few enough to see."""
    step_rows, step_cols = shape[0] // spec.in_channels, shape[1] // spec.out_channels
    if spec.in_channels <= MAX_GRID_LINES:
        for y in range(step_rows, shape[0], step_rows):
            ax.axhline(y, color="0.88", linewidth=0.4)
    if spec.out_channels <= MAX_GRID_LINES:
        for x in range(step_cols, shape[1], step_cols):
            ax.axvline(x, color="0.88", linewidth=0.4)


def _product(values: list[int]) -> str:
    return f"{'*'.join(map(str, values))} = {math.prod(values)}"



