"""The geometry of one transposed convolution, normalised from an ONNX ``ConvTranspose`` node.

``ConvTransposeSpec`` resolves ``auto_pad``, ``output_shape`` and ``output_padding`` into
explicit pads the way onnxruntime (1.32) does: a total padding computed from ``output_shape``
or ``SAME_*`` is clamped at zero, and an odd total puts the extra element at the end for
``SAME_UPPER`` and at the start otherwise, as the ONNX text says. An ``output_shape`` up to
``stride - 1`` beyond the natural size is accepted; the extra positions get the bias only.

Along one axis the transposed conv writes input ``i`` through kernel offset ``k`` to output
``i*s + k*d - pad_begin``; ``output_padding`` and an ``output_shape`` larger than the natural
size extend the end with positions that receive the bias only.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import NodeProto

from .conv import (
    GroupedGeometry,
    SpecError,
    auto_pad_attribute,
    bias_input,
    dims_text,
    group_attribute,
    int_attribute,
    pads_attribute,
    read_attributes,
    require_output,
    spatial_of,
    split_total,
)

OP_LABEL = "ConvTranspose"


@dataclass(frozen=True)
class ConvTransposeSpec(GroupedGeometry):
    """Geometry of one ConvTranspose. Spatial tuples have one entry per spatial axis.

    ``in_channels`` is C (the weight is ``[C, M/group, k...]``), ``out_channels`` is M.
    ``pads`` is ``begins + ends``, or ``None`` when ``output_shape`` fixes the output size
    while an input size is only known at run time (the pads would depend on it).
    ``output_shape`` holds the spatial sizes the attribute demands, if it is set.
    """

    output_padding: tuple[int, ...]
    output_shape: tuple[int, ...] | None

    def output_spatial(self) -> tuple[int | None, ...]:
        """Output spatial sizes; ``None`` where not known statically."""
        if self.output_shape is not None:
            return self.output_shape
        r = self.rank
        return tuple(
            None if size is None else
            (size - 1) * s + op + span - self.pads[i] - self.pads[i + r]
            for i, (size, s, op, span) in enumerate(
                zip(self.input_spatial, self.strides, self.output_padding, self.spans)))

    def window_ends(self) -> tuple[int, ...]:
        """Per axis, where the output window ends relative to ``input_size * stride``.

        The output is positions ``[pad_begin, pad_begin + out)`` of the uncropped result,
        and ``pad_begin + out = input_size * stride + window_end`` for every input size.
        """
        r = self.rank
        if self.output_shape is not None:  # is_static holds: the pads came from the sizes
            return tuple(self.pads[i] + out - size * s for i, (out, size, s) in enumerate(
                zip(self.output_shape, self.input_spatial, self.strides)))
        return tuple(op + span - s - self.pads[i + r] for i, (op, span, s) in enumerate(
            zip(self.output_padding, self.spans, self.strides)))

    def short(self) -> str:
        """Compact geometry string for reports, e.g. ``64->32 k2x2 s2x2 g1``."""
        parts = self.short_parts()
        if self.pads is None:
            parts.append("p?")
        elif any(self.pads):
            parts.append("p" + ",".join(str(p) for p in self.pads))
        if any(self.output_padding):
            parts.append(f"op{dims_text(self.output_padding)}")
        if self.output_shape is not None:
            parts.append(f"out{dims_text(self.output_shape)}")
        if self.group != 1:
            parts.append(f"g{self.group}")
        return " ".join(parts)


def conv_transpose_spec(
    node: NodeProto,
    weight_shape: tuple[int, ...],
    input_shape: tuple[int | None, ...] | None,
) -> ConvTransposeSpec:
    """Build the ``ConvTransposeSpec`` of a ConvTranspose node.

    ``input_shape`` is ``[N, C, spatial...]`` with ``None`` for unknown dims, or ``None``.

    Raises:
        SpecError: when attributes contradict the weight or each other.
    """
    attrs, rank, kernel = read_attributes(node, weight_shape)
    in_channels, out_per_group = weight_shape[0], weight_shape[1]
    group = group_attribute(attrs, in_channels, "input")
    strides = int_attribute(attrs, "strides", rank, 1, 1, OP_LABEL)
    dilations = int_attribute(attrs, "dilations", rank, 1, 1, OP_LABEL)
    output_padding = int_attribute(attrs, "output_padding", rank, 0, 0, OP_LABEL)
    if any(op >= s for op, s in zip(output_padding, strides)):  # as onnxruntime checks
        raise SpecError(f"output_padding={list(output_padding)} must be less than "
                        f"strides={list(strides)}")

    auto_pad = auto_pad_attribute(attrs)
    spatial = spatial_of(input_shape, rank)
    if input_shape is not None and input_shape[1] not in (None, in_channels):
        raise SpecError(f"input has {input_shape[1]} channels but the weight expects "
                        f"{in_channels}")

    output_shape = _output_shape(attrs, rank)
    spans = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    pads: tuple[int, ...] | None
    if output_shape is not None:
        pads = None
        if all(s is not None for s in spatial):
            totals = [(size - 1) * s + op + span - out for size, s, op, span, out in
                      zip(spatial, strides, output_padding, spans, output_shape)]
            for size, s, span, out, total in zip(spatial, strides, spans, output_shape, totals):
                if total < 0 and (out - span) // s + 1 != size:
                    raise SpecError(f"output_shape={list(output_shape)} is inconsistent with "
                                    f"the input size {list(spatial)}")
            pads = _split(totals, auto_pad)
    elif auto_pad.startswith("SAME"):
        # output = input * stride, so the total does not depend on the input size
        pads = _split([op + span - s for op, span, s in zip(output_padding, spans, strides)],
                      auto_pad)
    elif auto_pad == "VALID":
        pads = (0,) * (2 * rank)
    else:
        pads = pads_attribute(attrs, rank, OP_LABEL)

    spec = ConvTransposeSpec(
        name=node.name,
        input=node.input[0],
        weight=node.input[1],
        bias=bias_input(node),
        output=node.output[0],
        in_channels=in_channels,
        out_channels=out_per_group * group,
        group=group,
        kernel=kernel,
        strides=strides,
        dilations=dilations,
        pads=pads,
        output_padding=output_padding,
        output_shape=output_shape,
        auto_pad=auto_pad,
        input_spatial=spatial,
    )
    require_output(spec, "the pads leave no output")
    return spec


def _output_shape(attrs: dict, rank: int) -> tuple[int, ...] | None:
    """``output_shape``: spatial sizes only (onnxruntime refuses a model with N and C)."""
    values = attrs.get("output_shape")
    if not values:
        return None
    values = tuple(int(v) for v in values)
    if len(values) != rank or min(values) < 1:
        raise SpecError(f"output_shape={list(values)} invalid for a {rank}-D {OP_LABEL}")
    return values


def _split(totals: list[int], auto_pad: str) -> tuple[int, ...]:
    """Begins + ends of clamped total paddings, split as onnxruntime splits them."""
    pairs = [split_total(max(0, total), auto_pad == "SAME_UPPER") for total in totals]
    return tuple(b for b, _ in pairs) + tuple(e for _, e in pairs)
