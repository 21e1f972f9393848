"""pyvmm's pytest plugin's lab fixtures where they are meant to work, inside the lab: the device
on vfio-pci, mdevs made and removed, and a Linux guest running a script, with the lab's edu
passed through to it (a device test as a test writer would write it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.testing.linux import LinuxRun

MDEV_DEVICES = Path("/sys/bus/mdev/devices")
made_mdevs: list[str] = []  # (the next test checks that the fixture removed them)


@pytest.mark.lab
def test_vfio_device_is_the_labs_edu_on_vfio_pci(
    vfio_device: str, lab_devices: dict[str, str]
) -> None:
    assert vfio_device == lab_devices["edu"]
    driver = os.path.realpath(f"/sys/bus/pci/devices/{vfio_device}/driver")
    assert os.path.basename(driver) == "vfio-pci"


@pytest.mark.lab(devices=("nvme",))
def test_vfio_device_is_the_device_the_marker_asks_for(
    vfio_device: str, lab_devices: dict[str, str]
) -> None:
    assert vfio_device == lab_devices["nvme"]
    vendor = Path(f"/sys/bus/pci/devices/{vfio_device}/vendor").read_text().strip()
    assert vendor == "0x1b36"  # (QEMU's NVMe)


@pytest.mark.lab
def test_mdev_makes_mdevs(mdev: Callable[..., str]) -> None:
    first, second = mdev("mtty-2"), mdev("mtty-1")
    made_mdevs.extend([first, second])
    assert first != second
    assert (MDEV_DEVICES / first).is_dir() and (MDEV_DEVICES / second).is_dir()
    assert (MDEV_DEVICES / first / "mdev_type").resolve().name == "mtty-2"


@pytest.mark.lab
def test_the_mdevs_made_are_gone_after_their_test() -> None:
    assert made_mdevs, "test_mdev_makes_mdevs runs first"
    assert not [uuid for uuid in made_mdevs if (MDEV_DEVICES / uuid).exists()]


@pytest.mark.lab(session="linux")
def test_linux_guest_runs_a_script_on_a_passed_through_device(
    linux_guest: Callable[..., LinuxRun], vfio_device: str
) -> None:
    run = linux_guest(
        'echo "kernel $(uname -s)"\n'
        'for d in /sys/bus/pci/devices/*; do echo "pci $(cat $d/vendor):$(cat $d/device)"; done\n'
        "exit 3",
        pyvmm_args=["--vfio-pci", vfio_device],
    )
    assert (run.status, run.pyvmm_exit) == (3, 0), run.summary()
    assert run.output.startswith("kernel Linux\n"), run.summary()
    assert "pci 0x1234:0x11e8\n" in run.output, run.summary()  # the lab's edu, in the guest


@pytest.mark.lab(devices=("nvme",), session="linux")
def test_linux_sees_the_nvme(linux_guest: Callable[..., LinuxRun], vfio_device: str) -> None:
    """docs/testing.md's example, as it is written there."""
    run = linux_guest("cat /sys/class/nvme/nvme0/model", pyvmm_args=["--vfio-pci", vfio_device])
    assert run.status == 0, run.summary()
    assert run.output.startswith("QEMU NVMe Ctrl")
