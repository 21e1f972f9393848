"""A test guest runs under pyvmm on the lab's own /dev/kvm (nested SVM under TCG)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from guestbuild import guest


def build_hello() -> None:
    """Build the guests on the host: inside the lab the checkout is read-only."""
    guest("hello")


@pytest.mark.lab(before=build_hello)
def test_hello_runs_on_the_labs_kvm() -> None:
    hello = guest("hello")  # make finds it current and writes nothing
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", str(hello)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    print(f"pyvmm run hello.elf in the lab: {time.monotonic() - started:.2f} s wall")
    assert result.returncode == 0, result.stderr
    assert "Hello from pyvmm guest" in result.stdout
