"""`relay demo` run the way a new user runs it: a fresh directory, no config, one command."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import PROVIDER_KINDS

from .harness import clean_environ

pytestmark = pytest.mark.e2e

DEMO_TIMEOUT = 120.0


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_demo_command_as_a_new_user(tmp_path: Path) -> None:
    """`relay demo --port 0` exits 0, reports every task archived, and the files it lists exist."""
    cwd = tmp_path / "newcomer"
    cwd.mkdir()
    argv = [sys.executable, "-m", "relay", "demo", "--port", "0", "--per-provider", "1", "--data-dir", "demo-data"]
    done = subprocess.run(argv, cwd=cwd, env=clean_environ(), capture_output=True, text=True,
                          timeout=DEMO_TIMEOUT, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"relay demo exited {done.returncode}:\n{output}"
    total = len(PROVIDER_KINDS)
    assert f"{total}/{total} tasks archived" in output, output
    assert "cost per provider" in output and "USD" in output, output     # the day's cost per provider

    lines = done.stdout.splitlines()
    assert "archived files:" in lines, output
    listed = [line.strip() for line in lines[lines.index("archived files:") + 1:] if line.startswith("  ")]
    assert len(listed) == total, listed
    for name in listed:
        path = cwd / name   # relative paths are relative to where the user ran the command
        assert path.is_file(), f"listed file {name} does not exist"
        assert path.resolve().is_relative_to((cwd / "demo-data").resolve()), path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem, f"{name} is not its sha256"
