"""mdevs of the mtty sample driver: create, list, remove."""

from __future__ import annotations

import os

import pytest

from pyvmm.cli import main
from pyvmm.vfio.sysfs import Sysfs

pytestmark = pytest.mark.lab


def run_cli(*argv: str) -> int:
    """`pyvmm vfio ARGV...`, in this process (so capsys sees its output)."""
    return main(["vfio", *argv])


def available(sysfs: Sysfs, type_id: str) -> int:
    return next(t.available for t in sysfs.mdev_types() if t.type_id == type_id)


def test_mtty_2_create_and_remove(sysfs: Sysfs, capsys: pytest.CaptureFixture[str]) -> None:
    before = available(sysfs, "mtty-2")
    assert run_cli("mdev", "create", "mtty-2") == 0
    uuid = capsys.readouterr().out.strip()
    try:
        mdev = next(m for m in sysfs.mdevs() if m.uuid == uuid)
        assert (mdev.parent, mdev.type_id) == ("mtty", "mtty-2")
        assert mdev.iommu_group is not None
        assert mdev.cdev_node and os.path.exists(f"/dev/vfio/devices/{mdev.cdev}")
        assert available(sysfs, "mtty-2") == before - 1
        assert run_cli("mdev", "list") == 0
        assert uuid in capsys.readouterr().out
    finally:
        assert run_cli("mdev", "remove", uuid) == 0
    assert uuid not in {m.uuid for m in sysfs.mdevs()}
    assert available(sysfs, "mtty-2") == before


def test_unknown_mdev_type_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("mdev", "create", "mtty-9") == 1
    assert capsys.readouterr().err == "pyvmm vfio: no mdev type mtty-9\n"
