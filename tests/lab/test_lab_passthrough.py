"""PCI passthrough in the lab: the lab's devices, bound to vfio-pci, given to a pyvmm guest
through each VFIO backend."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from guestbuild import guest
from lab_passthrough import BACKENDS, build_passthrough_guests

from pyvmm.board.machine import Machine
from pyvmm.devices.testports import Checkpoint
from pyvmm.machine import layout
from pyvmm.machine.console import CaptureConsole
from pyvmm.uapi.kvm import KvmExit
from pyvmm.vfio.sysfs import Sysfs

MiB = 1 << 20


@pytest.mark.lab(before=build_passthrough_guests)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_passed_through_edu_is_on_the_guests_bus(backend: str, lab_devices) -> None:
    with Machine(mem_size=32 * MiB, console=CaptureConsole()) as machine:
        function = machine.add_device("vfio-pci", host=lab_devices["edu"], backend=backend)
        machine.load_elf(str(guest("pci-probe")))
        result = machine.run(timeout=120)
        out = machine.console.text
    assert result.exit_code == 0, out
    slot = function.devfn >> 3
    assert f"pci 00:{slot:02x}.0 1234:11e8 class 00ff00" in out, out
    bar0 = re.search(rf"pci 00:{slot:02x}\.0 .*\n  bar0 mem 0x([0-9a-f]+) size 0x100000", out)
    assert bar0, out


def run_with_checkpoints(machine: Machine) -> tuple[object, dict[int, int]]:
    """Run; return the result and, per checkpoint, how far into the exit trace it was."""
    marks: dict[int, int] = {}

    def checkpoint(phase: int) -> None:
        marks[phase] = len(machine.exits.trace or ())

    machine.pio.register(layout.CHECKPOINT_PORT, 4, Checkpoint(checkpoint), "checkpoint")
    return machine.run(timeout=240), marks


@pytest.mark.lab(before=build_passthrough_guests)
@pytest.mark.parametrize("backend", BACKENDS)
def test_edu_passed_through_works_with_no_python_on_its_data_or_interrupt_path(
    backend: str, lab_devices
) -> None:
    """The edu guest drives a passed-through edu: registers through BAR0 (an mmap in a KVM
    slot: no exit ever reaches Python for it), the factorial unit, DMA from guest RAM to the
    device and back (IOVA = guest-physical), MSI into its handler, then INTx with resampling,
    several rounds each. Between the checkpoints around the MSI rounds, the only exits are the
    guest's console, its config-space accesses to set up MSI, and the checkpoints."""
    with Machine(mem_size=64 * MiB, console=CaptureConsole(), trace_exits=True) as machine:
        function = machine.add_device("vfio-pci", host=lab_devices["edu"], backend=backend)
        assert machine.vfio_backend == backend
        machine.load_elf(str(guest("edu")))
        result, marks = run_with_checkpoints(machine)
        out = machine.console.text
        bar0 = function.bar_address(0)
        trace = list(machine.exits.trace or ())
    assert result.exit_code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith(f"edu: 00:{function.devfn >> 3:02x}.0 bar0 {bar0:#x}")
    assert lines[1:] == [
        "edu: id 0x10000ed liveness ok",
        "edu: factorial 5! = 120",
        "edu: factorial 10! = 3628800",
        "edu: dma 4096 bytes ok",
        "edu: msi 1 status 0x10",
        "edu: msi 2 status 0x20",
        "edu: msi 3 status 0x40",
        "edu: intx 1 status 0x1000",
        "edu: intx 2 status 0x2000",
        "edu: intx 3 status 0x4000",
        "edu: factorial irq ok",
        "edu: done",
    ], out
    mmio = [addr for reason, addr in trace if reason == KvmExit.MMIO]
    assert not [a for a in mmio if bar0 <= a < bar0 + (1 << 20)], "BAR0 accesses exited"
    allowed_ports = {*range(layout.COM1_PORT, layout.COM1_PORT + 8), *range(0xCF8, 0xD00)}
    allowed_ports |= {layout.CHECKPOINT_PORT}
    msi_phase = trace[marks[1] : marks[2]]
    assert msi_phase, "no exits at all between the checkpoints: the trace missed them"
    assert {(r, p) for r, p in msi_phase if not (r == KvmExit.IO and p in allowed_ports)} == set()


@pytest.mark.lab(before=build_passthrough_guests, devices=("e1000e",))
@pytest.mark.parametrize("backend", BACKENDS)
def test_msix_vectors_of_a_passed_through_e1000e_each_reach_their_handler(
    backend: str, lab_devices
) -> None:
    """Five MSI-X vectors programmed in the trapped table, each fired by the device; a masked
    vector delivers nothing and shows its pending bit until unmasked, then delivers once."""
    with Machine(mem_size=64 * MiB, console=CaptureConsole()) as machine:
        machine.add_device("vfio-pci", host=lab_devices["e1000e"], backend=backend)
        machine.load_elf(str(guest("e1000e-msix")))
        result = machine.run(timeout=240)
        out = machine.console.text
    assert result.exit_code == 0, out
    for vector in range(5):
        assert f"e1000e-msix: vector {vector} count 1\n" in out, out
    assert "e1000e-msix: vector 2 masked pending 1\n" in out
    assert "e1000e-msix: vector 2 unmasked count 2\n" in out
    assert out.endswith("e1000e-msix: done\n"), out


@pytest.fixture
def mtty() -> Iterator[str]:
    """An mtty-2 mdev of the kernel's sample driver, removed afterwards: its sysfs path."""
    sysfs = Sysfs("/")
    uuid = sysfs.create_mdev("mtty-2")
    try:
        yield f"/sys/bus/mdev/devices/{uuid}"
    finally:
        sysfs.remove_mdev(uuid)


@pytest.mark.lab(before=build_passthrough_guests)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_mtty_mdev_passed_through_with_vfio_dev(backend: str, mtty: str) -> None:
    """The mtty guest writes and reads the mdev's serial registers (an I/O BAR: the trapped
    path, pread/pwrite on the VFIO fd) and takes its INTx, which mtty will only unmask by
    ioctl: pyvmm says so and unmasks it from Python at each EOI."""
    result = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", str(guest("mtty")), "--vfio-dev", mtty,
         "--vfio-backend", backend],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.match(
        r"mtty: 00:[0-9a-f]{2}\.0 bar0 io 0x[0-9a-f]+ irq pin 1 line \d+\n", result.stdout
    )
    assert result.stdout.endswith(
        "mtty: round 1 got a\nmtty: round 2 got b\nmtty: round 3 got c\nmtty: done\n"
    ), result.stdout
    assert "pyvmm unmasks it from Python at each EOI instead" in result.stderr
