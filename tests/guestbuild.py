"""Builds the test guests (make -C guests) once per test session and finds their images."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUESTS = ROOT / "guests"

requires_kvm = pytest.mark.skipif(
    not os.path.exists("/dev/kvm"), reason="needs /dev/kvm, which this host does not have"
)


@functools.cache
def _build() -> Path:
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.fail("make and gcc are needed to build the test guests: run scripts/setup")
    result = subprocess.run(
        ["make", "-s", "-C", str(GUESTS)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"building the test guests failed:\n{result.stdout}\n{result.stderr}")
    return GUESTS / "build"


def guest(name: str) -> Path:
    """Path of guests/build/<name>.elf, building the guests first if needed."""
    path = _build() / f"{name}.elf"
    if not path.exists():
        pytest.fail(f"{path} was not built")
    return path
