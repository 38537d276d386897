"""The suite's own exit (tests/conftest.py ends the process with ``os._exit``): pytest's exit status must come
through it unchanged, or CI would pass a failing suite.

    .venv/bin/python -m pytest -q tests/test_suite_exit.py
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("processes", ["0", "2"])  # the test command runs two (pytest-xdist: cluster/local/dev.sh)
@pytest.mark.parametrize("body, status, summary", [
    ("assert 1 + 1 == 2", 0, "1 passed"),
    ("assert 1 + 1 == 3", 1, "1 failed"),
])
def test_the_exit_status_is_pytests(tmp_path, body, status, summary, processes):
    (tmp_path / "test_one.py").write_text(f"def test_one():\n    {body}\n")
    # tests/conftest.py as a plugin of a pytest run elsewhere: the same hook and atexit handler as in this suite
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "conftest",
                           "-n", processes, "--dist", "loadfile",
                           "--rootdir", str(tmp_path), "-c", "/dev/null", str(tmp_path / "test_one.py")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert summary in proc.stdout  # flushed before os._exit
