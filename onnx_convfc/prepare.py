"""Make a loaded model ready for planning: opsets new enough for the nodes we emit."""

from __future__ import annotations

from onnx import ModelProto, version_converter

from .options import RewriteOptions

# Pad with a pads input (11) and Slice with starts/ends/axes/steps inputs (10).
MIN_OPSET = 11


class PrepareError(ValueError):
    """The model cannot be made ready for rewriting."""


def default_opset(model: ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def prepare_model(model: ModelProto, options: RewriteOptions) -> tuple[ModelProto, list[str]]:
    """Return a prepared copy of ``model`` and notes on what was changed."""
    notes: list[str] = []
    copy = ModelProto()
    copy.CopyFrom(model)
    opset = default_opset(copy)
    if opset < MIN_OPSET:
        try:
            copy = version_converter.convert_version(copy, MIN_OPSET)
        except Exception as err:  # noqa: BLE001 - the converter raises many error types
            raise PrepareError(f"cannot upgrade opset {opset} to {MIN_OPSET}: {err}") from None
        notes.append(f"upgraded the default-domain opset from {opset} to {MIN_OPSET} "
                     "(the emitted Pad and Slice need it)")
    return copy, notes
