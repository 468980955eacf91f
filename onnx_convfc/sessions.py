"""onnxruntime sessions as parity, bench and profile make them: quiet and without spinning."""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnxruntime as ort

DEFAULT_THREADS = 0  # onnxruntime's own choice (one per physical core)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Quiet (failures become one-line errors, not log lines on stderr) and without spinning:
    idle onnxruntime threads spin after a run by default, taking the cores from whatever runs
    next (the numpy compare, the other model's session). ``threads``: intra-op threads, 0 =
    onnxruntime's choice."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def make_session(model: onnx.ModelProto | str | bytes, threads: int = DEFAULT_THREADS,
                 provider: str = "CPUExecutionProvider", optimized_path: str | None = None,
                 configure: Callable[[ort.SessionOptions], None] | None = None
                 ) -> ort.InferenceSession:
    """A session with ``threads`` intra-op threads (0 = onnxruntime's default), no spinning.

    ``optimized_path`` saves the graph as onnxruntime runs it, after its own optimisations;
    ``configure`` sets further options (profiling) before the session starts.
    """
    so = session_options(threads)
    so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if configure is not None:
        configure(so)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, so, providers=[provider])
