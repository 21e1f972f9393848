"""Fixtures for tests that run inside the lab (`@pytest.mark.lab`)."""

from __future__ import annotations

import os

import pytest

from pyvmm.vfio.sysfs import Sysfs


@pytest.fixture
def lab_devices() -> dict[str, str]:
    """The lab's devices as the agent reports them: {"edu": BDF, ...}, each on vfio-pci but an
    SR-IOV PF ("igb", on its own driver), whose VFs ("igbvf", "igbvf1") are."""
    pairs = os.environ.get("PYVMM_LAB_DEVICES", "")
    return dict(pair.split("=", 1) for pair in pairs.split(",") if pair)


@pytest.fixture
def sysfs() -> Sysfs:
    return Sysfs("/")
