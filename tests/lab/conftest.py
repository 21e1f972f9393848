"""Fixtures for tests that run inside the lab (`@pytest.mark.lab`); `lab_devices`, `mdev`
and `vfio_device` come with pyvmm's pytest plugin."""

from __future__ import annotations

import pytest

from pyvmm.vfio.sysfs import Sysfs


@pytest.fixture
def sysfs() -> Sysfs:
    return Sysfs("/")
