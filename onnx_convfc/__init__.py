"""onnx-convfc: rewrite the convolutions of an ONNX model as MatMul (fully connected) form.

Public API::

    model, report = rewrite_model("model.onnx", method="auto")
"""

from __future__ import annotations

import os

from onnx import ModelProto

from .inputs import check_input_shapes
from .io import InputError, load_model, save_model
from .options import RewriteOptions
from .parity import ParityReport, check_parity
from .report import ConvRow, Report
from .rewrite import rewrite

__all__ = [
    "ConvRow",
    "InputError",
    "ParityReport",
    "Report",
    "RewriteOptions",
    "check_parity",
    "load_model",
    "rewrite_model",
    "save_model",
]

__version__ = "0.1.0"


def rewrite_model(model_or_path: ModelProto | str | os.PathLike,
                  options: RewriteOptions | None = None,
                  **overrides) -> tuple[ModelProto, Report]:
    """Lower every conv of a model into MatMul form.

    Args:
        model_or_path: a ``ModelProto`` (left unchanged) or a path to load.
        options: the rewrite options; keyword ``overrides`` replace single fields.

    Returns:
        The rewritten model and a ``Report`` with one row per conv.
    """
    options = (options or RewriteOptions()).updated(**overrides)
    model = model_or_path if isinstance(model_or_path, ModelProto) else load_model(model_or_path)
    check_input_shapes(model, options.input_shapes)
    return rewrite(model, options)
