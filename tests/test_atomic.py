"""Atomic output: an interrupted or failing write leaves every old file as it was.

Failures are injected where a real run meets them: inside the write (an exception, Ctrl-C,
a full disk), between the renames of the external data file and the model, and Ctrl-C
arriving during the renames. After each, the previous output (model and external data)
and the input are byte for byte what they were, and no temporary file is left behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
from pathlib import Path

import onnx
import pytest

from onnx_convfc import cli, io
from onnx_convfc.cli import main
from onnx_convfc.io import InputError, read_model, save_model, save_text

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo_cnn.onnx"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _external_input(folder: Path) -> Path:
    """The demo model with every tensor in ``demo.bin`` beside it."""
    path = folder / "demo.onnx"
    onnx.save_model(onnx.load(DEMO), path, save_as_external_data=True, location="demo.bin",
                    size_threshold=0)
    return path


class _Failure(Exception):
    pass


def _failing_writes(monkeypatch, error: BaseException, after_files: int = 0) -> None:
    """Files opened for writing by ``io`` write half of their first chunk, then raise
    ``error``; the first ``after_files`` files are written normally."""
    real_fdopen = os.fdopen
    opened = []

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise error

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        opened.append(f)
        return f if len(opened) <= after_files else HalfWriter(f)

    monkeypatch.setattr(io.os, "fdopen", fdopen)


INTERRUPTIONS = {
    "exception": _Failure("boom"),
    "ctrl-c": KeyboardInterrupt(),
    "disk full": OSError(errno.ENOSPC, "No space left on device"),
}


@pytest.mark.parametrize("what", list(INTERRUPTIONS))
@pytest.mark.parametrize("external,after_files", [(False, 0), (True, 0), (True, 1)],
                         ids=["inline", "external-data-file", "external-model-file"])
def test_interrupted_save_keeps_the_previous_output(tmp_path, monkeypatch, what, external,
                                                    after_files):
    model = onnx.load(DEMO)
    out = tmp_path / "out.onnx"
    save_model(model, out, external_data=external)
    before = _snapshot(tmp_path)
    assert ("out.onnx.data" in before) == external
    changed = onnx.load(DEMO)
    changed.graph.initializer[0].raw_data = bytes(len(changed.graph.initializer[0].raw_data))
    _failing_writes(monkeypatch, INTERRUPTIONS[what], after_files)
    expected = InputError if what == "disk full" else type(INTERRUPTIONS[what])
    with pytest.raises(expected):
        save_model(changed, out, external_data=external)
    assert _snapshot(tmp_path) == before  # same files, same bytes, no temporaries


def test_failed_model_rename_puts_the_old_external_data_back(tmp_path, monkeypatch):
    """The data file is renamed first; when the model's rename then fails, the old data file
    returns, so the old model never reads new data."""
    out = tmp_path / "out.onnx"
    save_model(onnx.load(DEMO), out, external_data=True)
    before = _snapshot(tmp_path)
    changed = onnx.load(DEMO)
    changed.graph.initializer[0].raw_data = bytes(len(changed.graph.initializer[0].raw_data))
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst) == out and Path(src).name.endswith(".tmp"):
            raise OSError(errno.EACCES, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(InputError, match="cannot write"):
        save_model(changed, out, external_data=True)
    assert calls[:2] == ["out.onnx.data", "out.onnx"]  # the data file had been replaced
    assert _snapshot(tmp_path) == before
    assert read_model(out).model.graph.initializer[0].raw_data == \
        onnx.load(DEMO).graph.initializer[0].raw_data


def test_ctrl_c_during_the_renames_waits_for_them(tmp_path, monkeypatch):
    """SIGINT between the data file's rename and the model's is held back: both land, then
    KeyboardInterrupt is raised, and the files on disk belong together."""
    out = tmp_path / "out.onnx"
    save_model(onnx.load(DEMO), out, external_data=True)
    changed = onnx.load(DEMO)
    changed.graph.initializer[0].raw_data = bytes(len(changed.graph.initializer[0].raw_data))
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if Path(dst).name == "out.onnx.data":
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_model(changed, out, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert read_model(out).model.graph.initializer[0].raw_data == \
        changed.graph.initializer[0].raw_data
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_save_text_is_atomic(tmp_path, monkeypatch):
    report = tmp_path / "report.json"
    save_text("old\n", report)
    _failing_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(InputError, match="No space left"):
        save_text("new\n", report)
    assert _snapshot(tmp_path) == {"report.json": b"old\n"}


# ---------------------------------------------------------------- the CLI


@pytest.mark.parametrize("what", list(INTERRUPTIONS))
def test_cli_interrupted_inplace_leaves_the_input(tmp_path, monkeypatch, capsys, what):
    src = tmp_path / "demo.onnx"
    shutil.copy(DEMO, src)
    before = _snapshot(tmp_path)
    _failing_writes(monkeypatch, INTERRUPTIONS[what])
    code = {"exception": 2, "ctrl-c": 130, "disk full": 2}[what]
    assert main(["rewrite", str(src), "--inplace", "--quiet"]) == code
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert _snapshot(tmp_path) == before


def test_cli_interrupted_rewrite_keeps_the_previous_external_output(tmp_path, monkeypatch,
                                                                     capsys):
    src = _external_input(tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(src), "-o", str(out), "--quiet", "--method", "im2col"]) == 0
    before = _snapshot(tmp_path)
    assert {"out.onnx", "out.onnx.data", "demo.onnx", "demo.bin"} <= set(before)
    _failing_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"),
                    after_files=1)  # the data file is written, the model is not
    assert main(["rewrite", str(src), "-o", str(out), "--quiet", "--method", "auto"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_cli_never_modifies_the_input(tmp_path):
    src = _external_input(tmp_path)
    before = _snapshot(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert main(["rewrite", str(src), "--quiet", "--verify"]) == 0
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in before} == before
    assert {p: (tmp_path / p).stat().st_mtime_ns for p in stamps} == stamps
    assert sorted(set(after) - set(before)) == ["demo.convfc.onnx", "demo.convfc.onnx.data"]


def test_inplace_replaces_the_file_and_keeps_its_permissions(tmp_path):
    src = tmp_path / "demo.onnx"
    shutil.copy(DEMO, src)
    src.chmod(0o640)
    assert main(["rewrite", str(src), "--inplace", "--quiet"]) == 0
    assert stat.S_IMODE(src.stat().st_mode) == 0o640
    ops = {n.op_type for n in onnx.load(src).graph.node}
    assert "Conv" not in ops and "MatMul" in ops
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.onnx"]


def test_new_output_gets_the_umask_permissions_not_mkstemps(tmp_path):
    old = os.umask(0o022)
    try:
        save_model(onnx.load(DEMO), tmp_path / "out.onnx", external_data=True)
    finally:
        os.umask(old)
    for name in ("out.onnx", "out.onnx.data"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


@pytest.fixture(params=["in-memory", "staged"])
def verified_from(request, monkeypatch):
    """``--verify`` on a model that fits in one protobuf (checked before saving), or on one
    that does not (saved to a staged folder beside the output and checked from there)."""
    if request.param == "staged":
        monkeypatch.setattr(cli, "PROTOBUF_LIMIT", 0)
    return request.param


def test_failed_verify_writes_nothing_and_keeps_the_previous_output(tmp_path, capsys,
                                                                    verified_from):
    src = _external_input(tmp_path)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")
    (tmp_path / "out.onnx.data").write_bytes(b"previous data")
    before = _snapshot(tmp_path)
    code = main(["rewrite", str(src), "-o", str(out), "--quiet", "--verify", "--atol", "0",
                 "--rtol", "0", "--runs", "3"])
    captured = capsys.readouterr()
    assert code == 1 and "parity FAILED" in captured.out
    assert captured.err.strip().splitlines() == [cli.FAILED_NOTHING_WRITTEN]
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # nothing staged left


def test_passed_verify_writes_the_output_with_its_permissions(tmp_path, capsys, verified_from):
    src = _external_input(tmp_path)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")
    out.chmod(0o640)
    assert main(["rewrite", str(src), "-o", str(out), "--quiet", "--verify"]) == 0
    assert f"wrote {out}" not in capsys.readouterr().out  # --quiet
    model = read_model(out)
    assert model.external_data and "MatMul" in {n.op_type for n in model.model.graph.node}
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "demo.bin", "demo.onnx", "out.onnx", "out.onnx.data"]
