"""Every numbered script in ``examples/`` runs as documented, so the docs cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("[0-9][0-9]_*.py"))


def test_the_examples_are_found():
    assert len(EXAMPLES) >= 3, EXAMPLES


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_and_writes_a_model(script, tmp_path):
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout}\n{done.stderr}"
    assert "rewrote" in done.stdout
    written = list(tmp_path.glob("*.onnx"))
    assert len(written) == 1, written
    onnx.checker.check_model(onnx.load(written[0]))
