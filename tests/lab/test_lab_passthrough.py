"""PCI passthrough in the lab: the lab's devices, bound to vfio-pci, given to a pyvmm guest
through each VFIO backend."""

from __future__ import annotations

import re

import pytest
from guestbuild import guest

from pyvmm.devices.pci.testdev import PciTestDevice  # noqa: F401  (the guests' own build)
from pyvmm.machine.console import CaptureConsole
from pyvmm.machine.machine import Machine
from pyvmm.vfio.context import backends

MiB = 1 << 20
BACKENDS = sorted(backends())


def build_guests() -> None:
    """Build the guests on the host: inside the lab the checkout is read-only."""
    guest("pci-probe")


@pytest.mark.lab(before=build_guests)
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
