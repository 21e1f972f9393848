"""Finds a Linux kernel for host-tier boot tests: the lab kernel (PYVMM_LAB_KERNEL, or
../shared/lab/bzImage beside the checkout). Tests that need one skip, saying why, without it."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from pyvmm.machine.bzimage import extract_vmlinux

ROOT = Path(__file__).resolve().parents[1]


def lab_kernel() -> Path:
    candidates = [os.environ.get("PYVMM_LAB_KERNEL"), ROOT.parent / "shared" / "lab" / "bzImage"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.skip("no Linux kernel: set PYVMM_LAB_KERNEL or put the lab kernel in ../shared/lab")


@functools.cache
def _vmlinux(bzimage: Path, cache_dir: Path) -> Path:
    target = cache_dir / "vmlinux"
    target.write_bytes(extract_vmlinux(str(bzimage)))
    return target


def lab_vmlinux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uncompressed vmlinux (with its PVH note) from inside the lab bzImage."""
    return _vmlinux(lab_kernel(), tmp_path_factory.getbasetemp())
