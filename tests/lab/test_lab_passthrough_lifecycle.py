"""Passthrough's edges in the lab, through each backend: every way a pyvmm run can end leaves
the device assignable again at once, and each mistake a user can make is one line and a
non-zero exit."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from guestbuild import guest

from pyvmm.board.machine import Machine, StopReason
from pyvmm.machine.console import CaptureConsole
from pyvmm.vfio.backends import BACKENDS
from pyvmm.vfio.container import Container, Group
from pyvmm.vfio.sysfs import VFIO_PCI, Sysfs

BACKENDS = sorted(BACKENDS)


def build_guests() -> None:
    """Build the guests on the host: inside the lab the checkout is read-only."""
    for name in ("hello", "reset", "poweroff", "interrupts", "pci-probe", "edu"):
        guest(name)


def pyvmm_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error: "), result.stderr
    assert text in lines[0], lines[0]


@pytest.mark.lab(before=build_guests)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_exit_path_leaves_the_device_assignable(backend: str, lab_devices) -> None:
    """Each run assigns the device the previous run ended with: that it starts at all shows
    the device was released; the last run checks it still does DMA, MSI and INTx."""
    edu = lab_devices["edu"]
    vfio = ("--vfio-pci", edu, "--vfio-backend", backend)
    ends = (
        ("debug exit", (str(guest("pci-probe")), *vfio), 0),
        ("reset", (str(guest("reset")), *vfio), 0),
        ("poweroff", (str(guest("poweroff")), *vfio), 0),
        ("timeout", (str(guest("interrupts")), *vfio, "--timeout", "1"), 124),
        ("an error after assigning", (str(guest("hello")), *vfio, *vfio[:2]), 1),
    )
    for what, args, code in ends:
        result = pyvmm_run(*args)
        assert result.returncode == code, (what, result.stderr)
    assert "already assigned" in result.stderr
    for sent, code in ((signal.SIGINT, 130), (signal.SIGKILL, -signal.SIGKILL)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyvmm", "run", str(guest("interrupts")), *vfio],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == "interrupts: ready\n"
        proc.send_signal(sent)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert "Traceback" not in err
    # a guest that crashes (a triple fault), in this process
    with Machine(mem_size=32 << 20, console=CaptureConsole()) as machine:
        machine.add_device("vfio-pci", host=edu, backend=backend)
        machine.load_elf(str(guest("hello")))
        sregs = machine.vcpus[0].get_sregs()
        sregs.cr3 = 0x4000_0000  # page tables outside RAM: nothing can be fetched
        machine.vcpus[0].set_sregs(sregs)
        assert machine.run(timeout=60).reason in (StopReason.TRIPLE_FAULT, StopReason.ERROR)
    # and after all that, the device is assigned once more and still does DMA, MSI and INTx
    result = pyvmm_run(str(guest("edu")), *vfio)
    assert result.returncode == 0 and result.stdout.endswith("edu: done\n"), result.stdout


@pytest.mark.lab(before=build_guests)
def test_mistakes_are_one_line_and_leave_nothing_behind(lab_devices) -> None:
    edu = lab_devices["edu"]
    hello = str(guest("hello"))
    one_line_error(pyvmm_run(hello, "--vfio-pci", "0000:00:1f.7"), "no PCI device 0000:00:1f.7")
    one_line_error(pyvmm_run(hello, "--vfio-pci", "nonsense"), "is not a PCI address")
    host_bound = next(d for d in Sysfs("/").pci_devices() if d.driver not in (None, VFIO_PCI))
    one_line_error(
        pyvmm_run(hello, "--vfio-pci", host_bound.bdf),
        f"is bound to {host_bound.driver}: give it to VFIO with pyvmm vfio bind {host_bound.bdf}",
    )
    one_line_error(
        pyvmm_run(
            hello, "--vfio-dev", "/sys/bus/mdev/devices/00000000-0000-0000-0000-000000000000"
        ),
        "no mdev 00000000-0000-0000-0000-000000000000",
    )
    # a device open in another process, through its group
    group = Sysfs("/").pci_device(edu).iommu_group
    with Container() as container, Group(group) as held:
        container.add_group(held)
        with held.open_device(edu):
            one_line_error(
                pyvmm_run(hello, "--vfio-pci", edu, "--vfio-backend", "container"),
                f"VFIO group {group}: /dev/vfio/{group} is busy",
            )
            one_line_error(
                pyvmm_run(hello, "--vfio-pci", edu, "--vfio-backend", "iommufd"),
                "in use, e.g. through its VFIO group",
            )
    result = pyvmm_run(str(guest("pci-probe")), "--vfio-pci", edu)  # nothing was left behind
    assert result.returncode == 0 and "1234:11e8" in result.stdout, result.stderr


@pytest.mark.lab(before=build_guests)
def test_guest_ram_that_cannot_be_mapped_for_dma_is_one_line(lab_devices) -> None:
    """The legacy backend refuses more mappings than vfio_iommu_type1's dma_entry_limit: with
    the limit at 0, guest RAM cannot be mapped, which says why; with it back, all is well."""
    edu = lab_devices["edu"]
    limit = Path("/sys/module/vfio_iommu_type1/parameters/dma_entry_limit")
    saved = limit.read_text()
    limit.write_text("0")
    try:
        result = pyvmm_run(str(guest("hello")), "--vfio-pci", edu, "--vfio-backend", "container")
    finally:
        limit.write_text(saved)
    one_line_error(result, "failed: No space left on device (too many DMA mappings")
    result = pyvmm_run(str(guest("pci-probe")), "--vfio-pci", edu, "--vfio-backend", "container")
    assert result.returncode == 0 and "1234:11e8" in result.stdout, result.stderr
