"""Make a loaded model ready for planning, and say what was changed.

The work is done on a weightless copy (``skeleton.py``): large initializers are placeholders
whose data stays in the caller's model, or in arrays folded here, until the rewrite is done.
In order:
1. declared dims of -1 become unknown dims;
2. initializers that are also listed as graph inputs become plain constants (old exporters
   list every initializer as an input; IR 3 even requires it);
3. conv weights and biases computed by constant subgraphs (``ConstantOfShape``, ``Cast``,
   ``DequantizeLinear``, ``Reshape`` of initializers, ...) are evaluated and stored as
   initializers. Only the cone feeding those inputs is evaluated, with onnx's reference
   evaluator (onnxruntime where the reference lacks an op); its nodes are removed when nothing
   else reads them. A weight that depends on a graph input stays computed at run time (the
   rewrite then lowers its conv with a run-time weight, or skips it, and says which);
4. a default-domain opset older than the emitted nodes need is upgraded.
"""

from __future__ import annotations

import functools
import math
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import (
    FunctionProto,
    GraphProto,
    ModelProto,
    NodeProto,
    TensorProto,
    helper,
    numpy_helper,
    shape_inference,
    version_converter,
)
from onnx.reference import ReferenceEvaluator

from .emit import NameScope
from .families import FAMILIES
from .graphs import STANDARD_DOMAINS, Holder, constants, subgraphs, visible
from .io import first_line
from .skeleton import (
    LARGE_TENSOR_BYTES,
    Constant,
    TensorStore,
    placeholder,
    weightless_copy,
    write_array,
)

# Pad with a pads input (11) and Slice with starts/ends/axes/steps inputs (10).
MIN_OPSET = 11
# IR 4 is the first that lets an initializer stay out of the graph inputs.
MIN_IR_WITHOUT_LISTED_INITIALIZERS = 4
# The inputs, by index, of conv-like ops that the rewrite wants constant (weights, biases,
# quantization operands), and of BatchNormalization, which ``batchnorm.py`` folds into the
# lowered conv before it only when its parameters are constants: what folding looks at.
WEIGHT_INPUTS: dict[str, dict[int, str]] = {
    **{op: {index: role for role, index in family.roles()} for op, family in FAMILIES.items()},
    "BatchNormalization": {1: "scale", 2: "shift", 3: "mean", 4: "variance"},
}
# Most bytes the values of the constant subgraphs folded at once may take.
MAX_FOLD_BYTES = 4 * 2**30
# Ops whose new version in an opset up to ``MIN_OPSET`` (the key) changed nothing an older
# model relies on: onnx's version converter upgrades them as they are (its CompatibleAdapter).
COMPATIBLE_CHANGES: dict[int, frozenset[str]] = {
    10: frozenset({"AveragePool", "Dropout", "MaxPool"}),
    11: frozenset({
        "ArgMax", "ArgMin", "AveragePool", "Compress", "Concat", "Constant", "Conv",
        "ConvTranspose", "DepthToSpace", "Equal", "Flatten", "Gather", "Gemm", "Hardmax", "If",
        "LogSoftmax", "Loop", "LpPool", "MaxPool", "MaxUnpool", "NonMaxSuppression", "OneHot",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
        "ReduceSum", "ReduceSumSquare", "Scan", "Slice", "Softmax", "Split", "Squeeze", "TopK",
        "Unsqueeze"}),
}
RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
              "Multinomial", "Bernoulli"}


class PrepareError(ValueError):
    """The model cannot be made ready for rewriting."""


def default_opset(model: ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in STANDARD_DOMAINS:
            return entry.version
    return 1


@dataclass
class Prepared:
    """A prepared weightless copy, where its placeholders' data is, and what was changed."""

    model: ModelProto
    store: TensorStore
    notes: list[str]


def prepare(model: ModelProto) -> Prepared:
    """Prepare a weightless copy of ``model``; ``model`` itself is left unchanged."""
    copy, store = weightless_copy(model)
    ir = copy.ir_version
    notes = unknown_negative_dims(copy)
    notes += constants_from_inputs(copy)
    notes += fold_weight_cones(copy, store)
    notes += upgrade_opset(copy, store)
    if copy.ir_version != ir:
        notes.append(f"raised the IR version from {ir} to {copy.ir_version}, the lowest that "
                     "allows the opset and unlisted initializers")
    return Prepared(copy, store, notes)


def prepare_model(model: ModelProto) -> tuple[ModelProto, list[str]]:
    """Return a prepared copy of ``model``, weights included, and notes on what was changed."""
    prepared = prepare(model)
    prepared.store.fill(prepared.model.graph)
    return prepared.model, prepared.notes


def unknown_negative_dims(model: ModelProto) -> list[str]:
    """Clear declared negative dims of the main graph's values, in place.

    Some exporters (PaddlePaddle's, for one) write -1 for a dim they do not know; ONNX has no
    negative sizes, and shape inference would carry the -1 into conv geometry.
    """
    cleared = []
    graph = model.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        if not value.type.HasField("tensor_type"):
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.ClearField("dim_value")
                cleared.append(f"'{value.name}' axis {axis}")
    if not cleared:
        return []
    return [f"{len(cleared)} declared dim(s) of -1 (e.g. {cleared[0]}) treated as unknown"]


def constants_from_inputs(model: ModelProto) -> list[str]:
    """Remove initializers from the main graph's inputs, so they are constants."""
    graph = model.graph
    initialized = {t.name for t in graph.initializer}
    listed = [v.name for v in graph.input if v.name in initialized]
    if not listed:
        return []
    kept = [v for v in graph.input if v.name not in initialized]
    graph.ClearField("input")
    graph.input.extend(kept)
    if model.ir_version < MIN_IR_WITHOUT_LISTED_INITIALIZERS:
        model.ir_version = MIN_IR_WITHOUT_LISTED_INITIALIZERS
    return [f"{len(listed)} initializer(s) were also listed as graph inputs (e.g. "
            f"'{listed[0]}'); treated them as constants and removed them from the inputs"]


def upgrade_opset(model: ModelProto, store: TensorStore) -> list[str]:
    """Convert a weightless model whose default-domain opset is older than ``MIN_OPSET``, in
    place. The converter only reads small constants (shapes, axes, scales) and never rewrites
    a weight, so the placeholders must come out as they went in."""
    opset = default_opset(model)
    if opset >= MIN_OPSET:
        return []
    try:
        if _compatible_upgrade(model, opset):
            converted = _relabelled(model)
        else:
            converted = version_converter.convert_version(model, MIN_OPSET)
    except Exception as err:  # noqa: BLE001 - the converter raises many error types
        raise PrepareError(f"cannot upgrade opset {opset} to {MIN_OPSET}: "
                           f"{first_line(err)}") from None
    model.CopyFrom(converted)
    lost = store.missing(model.graph)
    if lost:
        raise PrepareError(f"cannot upgrade opset {opset} to {MIN_OPSET}: the converter "
                           f"changed initializer(s) {', '.join(sorted(lost))}")
    model.ir_version = max(model.ir_version,
                           helper.find_min_ir_version_for(model.opset_import, True))
    return [f"upgraded the default-domain opset from {opset} to {MIN_OPSET} "
            "(the emitted Pad and Slice need it)"]


def _compatible_upgrade(model: ModelProto, opset: int) -> bool:
    """Whether the version converter would change no node of ``model`` on its way from
    ``opset`` to ``MIN_OPSET``: one default-domain opset, main-graph nodes only, and every op
    either unchanged in between or changed only compatibly (``COMPATIBLE_CHANGES``)."""
    if opset + 1 not in COMPATIBLE_CHANGES or len(model.opset_import) != 1 \
            or model.opset_import[0].domain != "" or model.functions:
        return False
    op_types = set()
    for node in model.graph.node:
        if node.domain != "" or any(True for _ in subgraphs(node)):
            return False
        op_types.add(node.op_type)
    return all(_changes_compatibly(op, opset) for op in op_types)


@functools.cache
def _changes_compatibly(op_type: str, opset: int) -> bool:
    for version in range(opset + 1, MIN_OPSET + 1):
        try:
            changed = onnx.defs.get_schema(op_type, version).since_version == version
        except onnx.defs.SchemaError:  # unknown here: the converter says what is wrong
            return False
        if changed and op_type not in COMPATIBLE_CHANGES[version]:
            return False
    return True


def _relabelled(model: ModelProto) -> ModelProto:
    """What the converter returns for a model that ``_compatible_upgrade`` accepts: the model
    with the value_info shape inference adds (the converter infers shapes first) and the new
    opset. It costs a fifth of the converter (light_densenet121: 4 ms, not 20)."""
    converted = shape_inference.infer_shapes(model)
    converted.opset_import[0].version = MIN_OPSET
    return converted


@dataclass
class _FoldStats:
    folded: int = 0
    removed: Counter = field(default_factory=Counter)
    refused: list[str] = field(default_factory=list)


class _Dynamic(Exception):
    """A weight's cone reaches something that is not a constant; the message says what."""


def fold_weight_cones(model: ModelProto, store: TensorStore | None = None) -> list[str]:
    """Fold, in place, the constant subgraphs that compute conv weights into constants.

    With a ``store``, ``model`` is weightless: its placeholders' data is read from the store,
    and large folded values of the main graph are kept there, as arrays, behind placeholders.
    """
    stats = _FoldStats()
    _fold_holder(model.graph, {}, list(model.opset_import), stats, store)
    for function in model.functions:
        _fold_holder(function, {}, list(function.opset_import), stats)
    notes = []
    if stats.folded:
        removed = ", ".join(f"{n} {op}" for op, n in stats.removed.most_common())
        notes.append(f"folded {stats.folded} conv weight/bias input(s) (BatchNormalization "
                     f"parameters included) computed by constant subgraphs into "
                     f"constants (removed {sum(stats.removed.values())} "
                     f"node(s){': ' + removed if removed else ''})")
    return notes + stats.refused


def _fold_holder(holder: Holder, outer: Mapping[str, Constant], opsets: list,
                 stats: _FoldStats, store: TensorStore | None = None) -> None:
    """Fold the weight cones of one graph or function, then of the graphs nested in it.

    ``store``: the main graph's, when it is weightless (nested graphs keep their data).
    """
    consts = visible(constants(holder, store), outer)
    computed = [w for w in _weight_inputs(holder.node) if w[0] not in consts]
    producers = {o: i for i, n in enumerate(holder.node) for o in n.output if o} \
        if computed else {}
    inputs = {v.name for v in holder.input} if isinstance(holder, GraphProto) else \
        set(holder.input)
    cones: dict[str, set[int]] = {}
    fills: dict[str, np.ndarray] = {}
    fill_values = _FillValues()
    for name, conv, role in computed:
        if name in cones or name not in producers:
            continue
        fill = _constant_fill(holder.node[producers[name]], consts, fill_values)
        if fill is not None:
            cones[name], fills[name] = {producers[name]}, fill
            continue
        try:
            cones[name] = _cone(name, producers, holder, inputs, consts)
        except _Dynamic as why:
            stats.refused.append(f"cannot fold the {role} '{name}' of conv '{conv}': {why}; "
                                 "it stays computed at run time")
    values = _evaluate(holder, {n: c for n, c in cones.items() if n not in fills}, consts,
                       opsets, stats)
    values.update(fills)
    if values:
        _install(holder, values, cones, stats, store)
    nested = [sub for node in holder.node for sub in subgraphs(node)]
    if nested and values:
        consts = visible(constants(holder, store), outer)
    for sub in nested:
        _fold_holder(sub, consts, opsets, stats)


def _weight_inputs(nodes) -> Iterator[tuple[str, str, str]]:
    """(tensor name, conv name, role) of every weight input of conv-like nodes, nested too."""
    for node in nodes:
        roles = WEIGHT_INPUTS.get(node.op_type) if node.domain in STANDARD_DOMAINS else None
        for index, role in (roles or {}).items():
            if index < len(node.input) and node.input[index]:
                yield node.input[index], node.name or node.output[0], role
        for sub in subgraphs(node):
            yield from _weight_inputs(sub.node)


def _cone(target: str, producers: dict[str, int], holder: Holder, inputs: set[str],
          consts: Mapping[str, Constant]) -> set[int]:
    """Indices of the nodes computing ``target`` from constants (not reading ``inputs``, the
    holder's inputs), or raise ``_Dynamic``."""
    cone: set[int] = set()
    stack, seen = [target], set()
    while stack:
        name = stack.pop()
        if not name or name in seen or name in consts:
            continue
        seen.add(name)
        if name in inputs:
            raise _Dynamic(f"it depends on the graph input '{name}'")
        if name not in producers:
            raise _Dynamic(f"it depends on '{name}' of an enclosing graph, not a constant")
        node = holder.node[producers[name]]
        label = f"{node.op_type} '{node.name or node.output[0]}'"
        if node.domain not in STANDARD_DOMAINS:
            raise _Dynamic(f"it is computed by {label} of domain '{node.domain}'")
        if node.op_type in RANDOM_OPS or any(True for _ in subgraphs(node)):
            raise _Dynamic(f"it is computed by {label}, which cannot be folded")
        cone.add(producers[name])
        stack.extend(node.input)
    return cone


class _FillValues(dict):
    """The value attributes of ``ConstantOfShape`` nodes as arrays, by their bytes: a model
    making every weight this way repeats a few values hundreds of times."""

    def of(self, node: NodeProto) -> np.ndarray:
        tensor = next((a.t for a in node.attribute if a.name == "value"), None)
        if tensor is None:
            return np.zeros(1, np.float32)
        key = tensor.SerializeToString()
        if key not in self:
            self[key] = np.ascontiguousarray(numpy_helper.to_array(tensor))
        return self[key]


def _constant_fill(node: NodeProto, consts: Mapping[str, Constant],
                   values: _FillValues) -> np.ndarray | None:
    """The value of ``node`` when it is a ``ConstantOfShape`` of a constant shape, as a
    read-only broadcast view: it takes no memory until a lowering reorders it (the Model Zoo
    models bundled with onnx make every weight this way)."""
    if node.op_type != "ConstantOfShape" or node.domain not in STANDARD_DOMAINS \
            or not node.input:
        return None
    shape = consts.get(node.input[0])
    if shape is None:
        return None
    dims = _dims(shape)
    value = values.of(node)
    if value.size != 1 or dims is None:
        return None  # malformed: let the evaluator say why
    if min(dims, default=0) < 0 or math.prod(dims) * value.itemsize > MAX_FOLD_BYTES:
        return None  # the evaluator refuses it with the reason (``_refuse_large_cones``)
    if value.dtype.hasobject:
        return np.broadcast_to(value.reshape(()), dims)
    view = np.ndarray(dims, value.dtype, buffer=value, strides=(0,) * len(dims))
    view.flags.writeable = False  # as ``np.broadcast_to`` makes it, at a third of the cost
    return view


def _dims(shape: Constant) -> tuple[int, ...] | None:
    """The values of a 1-D shape tensor (``None`` for another rank); int64 ``raw_data``, the
    common case, is read without ``numpy_helper``'s general path."""
    if isinstance(shape, TensorProto) and shape.data_type == TensorProto.INT64 \
            and len(shape.dims) == 1 and shape.HasField("raw_data") and sys.byteorder == "little":
        raw = shape.raw_data
        if len(raw) == 8 * shape.dims[0]:
            return tuple(np.frombuffer(raw, np.int64).tolist())
    array = shape if isinstance(shape, np.ndarray) else numpy_helper.to_array(shape)
    return tuple(int(d) for d in array) if array.ndim == 1 else None


def _evaluate(holder: Holder, cones: dict[str, set[int]], consts: Mapping[str, Constant],
              opsets: list, stats: _FoldStats) -> dict[str, np.ndarray]:
    """Values of the cone outputs: all at once, or one by one when that fails."""
    if not cones:
        return {}
    try:
        return _run_cones(holder, cones, consts, opsets)
    except Exception:  # noqa: BLE001 - find out below which cone fails, and why
        pass
    values = {}
    for name, cone in cones.items():
        try:
            values.update(_run_cones(holder, {name: cone}, consts, opsets))
        except Exception as err:  # noqa: BLE001 - the reference evaluator raises anything
            stats.refused.append(f"cannot fold '{name}': evaluating its constant subgraph "
                                 f"failed ({first_line(err)}); it stays computed at run time")
    return values


def _run_cones(holder: Holder, cones: dict[str, set[int]], consts: Mapping[str, Constant],
               opsets: list) -> dict[str, np.ndarray]:
    nodes = [holder.node[i] for i in sorted(set().union(*cones.values()))]
    leaves = sorted({i for n in nodes for i in n.input if i in consts})
    graph = helper.make_graph(nodes, "weight_cones", [],
                              [helper.make_empty_tensor_value_info(t) for t in cones],
                              [_named(consts[name], name) for name in leaves])
    model = helper.make_model(graph, opset_imports=opsets)
    _refuse_large_cones(model)
    try:
        results = ReferenceEvaluator(model).run(None, {})
    except Exception:  # noqa: BLE001 - e.g. an op the reference lacks at this opset
        results = _run_with_onnxruntime(model)
    return {name: np.asarray(value) for name, value in zip(cones, results)}


def _run_with_onnxruntime(model: ModelProto) -> list:
    """onnxruntime knows every opset from 7 on, where the reference evaluator has gaps."""
    import onnxruntime as ort

    model.ir_version = max(MIN_IR_WITHOUT_LISTED_INITIALIZERS,
                           helper.find_min_ir_version_for(model.opset_import, True))
    options = ort.SessionOptions()
    options.log_severity_level = 4  # its errors become a note; nothing on stderr
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {})


def _refuse_large_cones(model: ModelProto) -> None:
    """Raise before evaluating cones whose values shape inference says would take more than
    ``MAX_FOLD_BYTES``: a few bytes of ``ConstantOfShape`` can ask for gigabytes. Values of
    unknown size count as empty (inference is best effort)."""
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - the evaluators report what is wrong with the cone
        return
    sizes = {}
    for value in (*inferred.graph.value_info, *inferred.graph.output):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 1
        sizes[value.name] = math.prod(dims) * itemsize
    total = sum(sizes.values())
    if total > MAX_FOLD_BYTES:
        raise ValueError(f"its values would take {total} bytes, over the {MAX_FOLD_BYTES} "
                         "bytes folding may compute")


def _install(holder: Holder, values: dict[str, np.ndarray], cones: dict[str, set[int]],
             stats: _FoldStats, store: TensorStore | None) -> None:
    """Store the folded values as constants and drop the cone nodes nothing else reads.

    A folded tensor whose node must stay (another of its outputs is read) gets a new name,
    and the convs read that instead. With a ``store``, large values stay arrays in it, behind
    placeholders.
    """
    candidates = set().union(*(cones[name] for name in values))
    folded, renamed = set(values), set()
    while True:
        removed, keep_producing, used = _prune(holder, candidates, folded)
        if not keep_producing:
            break
        folded -= keep_producing
        renamed |= keep_producing
    own_leaves = {i for k in removed for i in holder.node[k].input} - used
    removed |= {k for k, n in enumerate(holder.node)
                if n.op_type == "Constant" and n.output[0] in own_leaves}
    stats.removed.update(holder.node[k].op_type for k in removed)
    stats.folded += len(values)
    names = {name: name for name in folded}
    fresh = NameScope({o for n in holder.node for o in n.output} | used) if renamed else None
    for name in sorted(renamed):
        names[name] = fresh.take(f"{name}/folded")
        _rename_weight_inputs(holder.node, name, names[name])
    for k in sorted(removed, reverse=True):
        del holder.node[k]
    if isinstance(holder, GraphProto):
        stale = [k for k, t in enumerate(holder.initializer) if t.name in own_leaves]
        for k in reversed(stale):
            if store is not None:
                store.forget(holder.initializer[k].name)
            del holder.initializer[k]
        for name, new in sorted(names.items()):
            if store is not None and values[name].nbytes >= LARGE_TENSOR_BYTES:
                placeholder(holder, new, values[name])
                store.keep(new, values[name])
            else:
                write_array(holder.initializer.add(), values[name], new)
    else:
        kept = list(holder.node)
        holder.ClearField("node")
        holder.node.extend([helper.make_node("Constant", [], [new],
                                             value=numpy_helper.from_array(values[name], new))
                            for name, new in sorted(names.items())] + kept)


def _rename_weight_inputs(nodes, old: str, new: str) -> None:
    """Make the weight inputs of conv-like nodes (nested ones too) read ``new``, not ``old``."""
    for node in nodes:
        roles = WEIGHT_INPUTS.get(node.op_type) if node.domain in STANDARD_DOMAINS else None
        for index in roles or ():
            if index < len(node.input) and node.input[index] == old:
                node.input[index] = new
        for sub in subgraphs(node):
            _rename_weight_inputs(sub.node, old, new)


def _prune(holder: Holder, candidates: set[int], folded: set[str]
           ) -> tuple[set[int], set[str], set[str]]:
    """Which candidate nodes nothing reads any more (with ``folded`` now constants).

    Returns the removable node indices, the folded names whose producer must stay, and the
    names read once those nodes are gone.
    """
    outputs = holder.output if isinstance(holder, FunctionProto) else \
        [v.name for v in holder.output]
    used = set(outputs)
    for k, node in enumerate(holder.node):
        if k not in candidates:
            _add_reads(node, used)
    removable, keep_producing = set(), set()
    for k in sorted(candidates, reverse=True):
        node = holder.node[k]
        if any(o in used and o not in folded for o in node.output if o):
            _add_reads(node, used)
            keep_producing |= folded.intersection(node.output)
        else:
            removable.add(k)
    return removable, keep_producing, used


def _add_reads(node: NodeProto, names: set[str]) -> None:
    """Add to ``names`` those a node reads, including those read inside its subgraphs."""
    names.update(node.input)
    for sub in subgraphs(node):
        for inner in sub.node:
            _add_reads(inner, names)
        names.update(v.name for v in sub.output)


def _named(tensor: Constant, name: str) -> TensorProto:
    """``tensor`` itself, or a copy named ``name`` (a ``Constant``'s tensor has its own name)."""
    if isinstance(tensor, np.ndarray):
        return numpy_helper.from_array(tensor, name)
    if tensor.name == name:
        return tensor
    copy = TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy
