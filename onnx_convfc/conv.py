"""The geometry of one convolution, normalised from an ONNX ``Conv`` node.

``ConvSpec`` is the one description every lowering reads. It resolves defaults and
``auto_pad`` into explicit padding wherever the spatial sizes allow it, so lowerings never
look at node attributes again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnx import NodeProto, helper

AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


class SpecError(ValueError):
    """The node's attributes contradict its weight or the ONNX spec."""


def dims_text(values: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in values)


@dataclass(frozen=True)
class GroupedGeometry:
    """The fields every conv-family spec has, and what follows from them the same way.

    ``input_spatial`` holds ``None`` for a dimension that is not known statically; ``pads``
    is ``begins + ends`` as in ONNX, or ``None`` when it depends on a run-time size.
    """

    name: str
    input: str
    weight: str
    bias: str | None
    output: str
    in_channels: int
    out_channels: int
    group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None
    auto_pad: str
    input_spatial: tuple[int | None, ...]

    @property
    def rank(self) -> int:
        return len(self.kernel)

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.group

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.group

    @property
    def is_static(self) -> bool:
        return all(s is not None for s in self.input_spatial) and self.pads is not None

    @property
    def taps(self) -> int:
        """Number of kernel offsets (product of the kernel shape)."""
        return math.prod(self.kernel)

    @property
    def spans(self) -> tuple[int, ...]:
        """Reach of the dilated kernel per axis: ``(k - 1) * d + 1``."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))

    def short_parts(self) -> list[str]:
        """Channels, kernel, and strides/dilations where not 1, for report strings."""
        parts = [f"{self.in_channels}->{self.out_channels}", f"k{dims_text(self.kernel)}"]
        if any(s != 1 for s in self.strides):
            parts.append(f"s{dims_text(self.strides)}")
        if any(d != 1 for d in self.dilations):
            parts.append(f"d{dims_text(self.dilations)}")
        return parts


@dataclass(frozen=True)
class ConvSpec(GroupedGeometry):
    """Geometry of one conv. Spatial tuples have one entry per spatial axis; ``pads`` is
    ``None`` only when ``auto_pad`` is SAME_* and a strided axis has a run-time size.
    """

    @property
    def extents(self) -> tuple[int, ...]:
        """Span of the dilated kernel minus one, per axis: ``(k - 1) * d``."""
        return tuple(span - 1 for span in self.spans)

    def padded_spatial(self) -> tuple[int, ...] | None:
        if not self.is_static:
            return None
        r = self.rank
        return tuple(
            s + self.pads[i] + self.pads[i + r] for i, s in enumerate(self.input_spatial)
        )

    def output_spatial(self) -> tuple[int | None, ...]:
        """Output spatial sizes; ``None`` where not known statically."""
        out: list[int | None] = []
        spans = self.spans
        for i, s in enumerate(self.input_spatial):
            if s is None:
                out.append(None)
            elif self.pads is None:  # SAME_* with unknown pads can only be the dynamic case
                out.append(-(-s // self.strides[i]))
            else:
                padded = s + self.pads[i] + self.pads[i + self.rank]
                out.append((padded - spans[i]) // self.strides[i] + 1)
        return tuple(out)

    def short(self) -> str:
        """Compact geometry string for reports, e.g. ``32->32 k3x3 s2x2 p1,1,1,1 g32``."""
        pads = ",".join(str(p) for p in self.pads) if self.pads is not None else self.auto_pad
        parts = self.short_parts()
        if self.pads is None or any(self.pads):
            parts.append(f"p{pads}")
        if self.group != 1:
            parts.append(f"g{self.group}")
        return " ".join(parts)


def same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    """(begin, end) padding of ``auto_pad=SAME_UPPER/SAME_LOWER`` for one axis."""
    out = -(-size // stride)
    return split_total(max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size), upper)


def split_total(total: int, upper: bool) -> tuple[int, int]:
    """(begin, end) of a SAME total padding: the odd one at the end (upper) or the begin."""
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def read_attributes(node: NodeProto, weight_shape: tuple[int, ...]
                    ) -> tuple[dict, int, tuple[int, ...]]:
    """The node's attributes, its spatial rank and kernel, after checking the weight shape
    and any ``kernel_shape`` against each other (shared by every conv-family op)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if len(weight_shape) < 3:
        raise SpecError(f"weight has rank {len(weight_shape)}, expected at least 3")
    if any(d <= 0 for d in weight_shape):
        raise SpecError(f"weight shape {list(weight_shape)} has an empty dimension")
    kernel = tuple(weight_shape[2:])
    declared_kernel = attrs.get("kernel_shape")
    if declared_kernel is not None and tuple(declared_kernel) != kernel:
        raise SpecError(f"kernel_shape={list(declared_kernel)} contradicts weight {list(kernel)}")
    return attrs, len(kernel), kernel


def int_attribute(attrs: dict, name: str, rank: int, default: int, minimum: int,
                  op_label: str) -> tuple[int, ...]:
    """A per-axis int attribute (``strides``, ``dilations``...), checked for length and floor."""
    values = tuple(int(v) for v in attrs.get(name, [default] * rank))
    if len(values) != rank or min(values) < minimum:
        raise SpecError(f"{name}={list(values)} invalid for a {rank}-D {op_label}")
    return values


def pads_attribute(attrs: dict, rank: int, op_label: str) -> tuple[int, ...]:
    """Explicit ``pads`` (begins, then ends), checked for length and sign."""
    pads = tuple(attrs.get("pads", [0] * (2 * rank)))
    if len(pads) != 2 * rank or min(pads) < 0:
        raise SpecError(f"pads={list(pads)} invalid for a {rank}-D {op_label}")
    return pads


def group_attribute(attrs: dict, channels: int, which: str) -> int:
    """``group``, checked to divide the ``which`` (input or output) channel count."""
    group = int(attrs.get("group", 1))
    if group < 1 or channels % group:
        raise SpecError(f"group={group} does not divide the {channels} {which} channels")
    return group


def require_output(spec: GroupedGeometry, why: str) -> None:
    """Raise ``SpecError(why)`` when a statically known output size is below 1."""
    if any(size is not None and size < 1 for size in spec.output_spatial()):
        raise SpecError(why)


def auto_pad_attribute(attrs: dict) -> str:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in AUTO_PADS:
        raise SpecError(f"unknown auto_pad={auto_pad!r}")
    return auto_pad


def spatial_of(input_shape: tuple[int | None, ...] | None, rank: int) -> tuple[int | None, ...]:
    """The input's spatial sizes (``None`` where unknown), checked against the weight's rank."""
    if input_shape is None:
        return (None,) * rank
    if len(input_shape) != rank + 2:
        raise SpecError(f"input has rank {len(input_shape)} but the weight is {rank}-D")
    return tuple(input_shape[2:])


def bias_input(node: NodeProto, index: int | None = 2) -> str | None:
    """The bias input's name, ``None`` when absent (or when the op has none: ``index=None``)."""
    if index is None:
        return None
    return node.input[index] if len(node.input) > index and node.input[index] else None


def conv_spec(
    node: NodeProto,
    weight_shape: tuple[int, ...],
    input_shape: tuple[int | None, ...] | None,
    weight_index: int = 1,
    bias_index: int | None = 2,
) -> ConvSpec:
    """Build the ``ConvSpec`` of a Conv node from its weight shape and (maybe) input shape.
    The quantized convs give their own weight and bias positions.

    ``input_shape`` is the full ``[N, C, spatial...]`` shape with ``None`` for unknown
    dims, or ``None`` when even the rank is unknown (the weight gives the rank then).

    Raises:
        SpecError: when attributes contradict the weight or each other.
    """
    attrs, rank, kernel = read_attributes(node, weight_shape)
    out_channels, in_per_group = weight_shape[0], weight_shape[1]
    group = group_attribute(attrs, out_channels, "output")
    strides = int_attribute(attrs, "strides", rank, 1, 1, "conv")
    dilations = int_attribute(attrs, "dilations", rank, 1, 1, "conv")
    auto_pad = auto_pad_attribute(attrs)
    spatial = spatial_of(input_shape, rank)
    in_channels = in_per_group * group
    if input_shape is not None and input_shape[1] is not None and input_shape[1] != in_channels:
        raise SpecError(
            f"input has {input_shape[1]} channels but weight and group={group} "
            f"expect {in_channels}"
        )

    pads: tuple[int, ...] | None
    if auto_pad == "NOTSET":
        pads = pads_attribute(attrs, rank, "conv")
    elif auto_pad == "VALID":
        pads = (0,) * (2 * rank)
    else:
        pads = _resolve_same(spatial, kernel, strides, dilations, auto_pad == "SAME_UPPER")

    spec = ConvSpec(
        name=node.name,
        input=node.input[0],
        weight=node.input[weight_index],
        bias=bias_input(node, bias_index),
        output=node.output[0],
        in_channels=in_channels,
        out_channels=out_channels,
        group=group,
        kernel=kernel,
        strides=strides,
        dilations=dilations,
        pads=pads,
        auto_pad=auto_pad,
        input_spatial=spatial,
    )
    require_output(spec, "the kernel is larger than the padded input")
    return spec


def _resolve_same(spatial, kernel, strides, dilations, upper) -> tuple[int, ...] | None:
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        if size is None:
            if s != 1:
                return None  # total padding depends on the run-time size
            b, e = split_total((k - 1) * d, upper)  # stride 1: independent of the size
        else:
            b, e = same_pads(size, k, s, d, upper)
        begins.append(b)
        ends.append(e)
    return tuple(begins + ends)
