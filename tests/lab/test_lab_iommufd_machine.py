"""A machine's iommufd objects in the lab: `--hwpt` (an assigned edu on an explicit HWPT over
the guest-RAM IOAS), a HWPT replace while the guest runs through the control socket, the
objects as `pyvmm iommufd objects` shows them, `pyvmm iommufd info`, and `--viommu nested`:
refused with one line on the lab's IOMMUs, built on the selftest mock."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from guestbuild import guest
from lab_edu import EDU_BUFFER, bar0, dma
from lab_passthrough import build_passthrough_guests

from pyvmm.board.machine import Machine
from pyvmm.control.client import ControlClient, ControlError
from pyvmm.control.server import ControlServer
from pyvmm.devices.pci.device import PCI_COMMAND
from pyvmm.machine.console import CaptureConsole
from pyvmm.uapi import iommufd as uapi
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.iommufd import mock
from pyvmm.vfio.iommufd.backend import IommufdContext
from pyvmm.vfio.iommufd.hwpt import Hwpt
from pyvmm.vfio.iommufd.mock import MockDevice
from pyvmm.vfio.iommufd.nesting import Nesting, can_nest
from pyvmm.vfio.iommufd.objects import Iommufd
from pyvmm.vfio.passthrough.function import VfioPciFunction

MiB = 1 << 20
PAGE = 4096
SOURCE, TARGET = 0x0200_0000, 0x0200_0000 + 16 * PAGE  # guest RAM the device copies between
MEMORY_AND_MASTER = 0x6


def build_guests() -> None:
    build_passthrough_guests()
    guest("counter")


IOMMUS = [
    pytest.param(iommu, marks=pytest.mark.lab(iommu=iommu, before=build_guests))
    for iommu in ("intel", "virtio")
]


def pyvmm(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.fixture
def counting_with_edu(lab_devices: dict[str, str]) -> Iterator[Machine]:
    """A machine with edu on an explicit HWPT (`--hwpt`), counting in its RAM."""
    with Machine(mem_size=64 * MiB, console=CaptureConsole()) as machine:
        function = machine.add_device(
            "vfio-pci", host=lab_devices["edu"], backend="iommufd", hwpt=True
        )
        command = function.config_read(PCI_COMMAND, 2)
        function.config_write(PCI_COMMAND, 2, command | MEMORY_AND_MASTER)  # as a driver does
        machine.load_elf(str(guest("counter")))
        machine.start()
        machine.console.wait_for(r"count 1024\n", 60)  # type: ignore[attr-defined]
        yield machine


def copy_in_guest_ram(machine: Machine, offset: int) -> bool:
    """edu copies a fresh page of guest RAM at SOURCE to TARGET + offset, by its page table."""
    (function,) = [f for f in machine.pci.functions.values() if isinstance(f, VfioPciFunction)]
    page = os.urandom(PAGE)
    machine.memory.write(SOURCE, page)
    registers = bar0(function.device)
    dma(registers, SOURCE, EDU_BUFFER, PAGE, to_ram=False)
    dma(registers, EDU_BUFFER, TARGET + offset, PAGE, to_ram=True)
    return machine.memory.read(TARGET + offset, PAGE) == page


@pytest.mark.parametrize("iommu", IOMMUS)
def test_hwpt_replace_while_the_guest_runs_over_the_control_socket(
    iommu: str, counting_with_edu: Machine, lab_devices: dict[str, str], tmp_path: Path
) -> None:
    machine = counting_with_edu
    context = machine.vfio()
    assert isinstance(context, IommufdContext)
    edu = lab_devices["edu"]
    (explicit,) = [o for o in context.iommufd.objects() if isinstance(o, Hwpt)]
    assert context.hwpt_ids[edu] == explicit.id and explicit.over is context.ioas
    assert copy_in_guest_ram(machine, 0)  # DMA into guest RAM through the explicit HWPT

    path = str(tmp_path / "control")
    server = ControlServer(machine, path)
    try:
        with ControlClient(path) as client:
            new = client.execute("hwpt-alloc", device=edu)["id"]
            assert client.execute("hwpt-attach", device=edu, id=new) == {"hwpt": new}
            assert context.hwpt_ids[edu] == new
            assert copy_in_guest_ram(machine, PAGE)  # the same RAM through the new table
            client.execute("iommufd-destroy", id=explicit.id)  # no longer used
            objects = {o["id"]: o for o in client.execute("iommufd-objects")["objects"]}
            assert {o["type"] for o in objects.values()} == {"ioas", "hwpt", "device"}
            assert objects[new]["parents"] == [context.ioas.id]
            device = next(o for o in objects.values() if o["type"] == "device")
            assert device["name"] == edu and device["parents"] == [new]
            with pytest.raises(
                ControlError, match=rf"ioas {context.ioas.id} belongs to the machine"
            ):
                client.execute("iommufd-destroy", id=context.ioas.id)
            with pytest.raises(ControlError, match="not the machine's IOAS nor a paging HWPT over"):
                client.execute("hwpt-attach", device=edu, id=device["id"])
        shown = pyvmm("iommufd", "objects", path)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines() == [
            f"ioas {context.ioas.id}",
            f"  hwpt {new} flags=- data_type=paging",
            f"    device {device['id']} name={edu} hwpt={new}",
        ], shown.stdout
    finally:
        server.close()
    assert copy_in_guest_ram(machine, 2 * PAGE)
    name = "intel-vtd" if iommu == "intel" else "none"
    lacks = rf"its IOMMU \({name}\) cannot track dirty pages: no IOMMU_HW_CAP_DIRTY_TRACKING"
    with pytest.raises(VfioError, match=rf"{edu}: DMA dirty tracking: {lacks}"):
        context.dirty_log().start()
    assert context.hwpt_ids[edu] == new  # refused before anything moved
    assert copy_in_guest_ram(machine, 3 * PAGE)


@pytest.mark.lab(before=build_guests)
def test_run_with_hwpt_passes_edu_through_and_a_container_refuses_it(lab_devices) -> None:
    result = pyvmm(
        "run", str(guest("edu")), "--vfio-pci", lab_devices["edu"], "--vfio-backend", "iommufd",
        "--hwpt",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "edu: dma 4096 bytes ok" in result.stdout and "edu: done" in result.stdout
    refused = pyvmm(
        "run", str(guest("edu")), "--vfio-pci", lab_devices["edu"], "--vfio-backend",
        "container", "--hwpt",
    )  # fmt: skip
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == (
        f"pyvmm: error: {lab_devices['edu']}: --hwpt needs the iommufd backend "
        "(--vfio-backend iommufd)\n"
    )


@pytest.mark.parametrize("iommu", IOMMUS)
def test_viommu_nested_is_refused_with_what_the_labs_iommu_lacks(iommu: str, lab_devices) -> None:
    edu = lab_devices["edu"]
    result = pyvmm(
        "run", str(guest("edu")), "--vfio-pci", edu, "--vfio-backend", "iommufd",
        "--viommu", "nested",
    )  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    lacks = (
        r"its IOMMU \(intel-vtd\) cannot nest: its ECAP register lacks .*NEST"
        if iommu == "intel"
        else r"its IOMMU \(none\) cannot nest: its driver reports no hardware information"
    )
    assert re.fullmatch(rf"pyvmm: error: {edu}: --viommu nested: {lacks}.*\n", result.stderr)
    info = pyvmm("iommufd", "info", edu)
    assert info.returncode == 0, info.stderr
    assert re.search(r"^iommu +" + ("intel-vtd" if iommu == "intel" else "none"), info.stdout, re.M)
    assert re.search(r"^nesting +no: ", info.stdout, re.M), info.stdout
    assert re.search(r"^dirty tracking +no: ", info.stdout, re.M), info.stdout


@pytest.mark.lab
def test_nesting_is_built_on_the_mock_over_guest_ram() -> None:
    """What `--viommu nested` builds where the IOMMU can nest, on the mock: the NEST_PARENT
    stage 2 over the RAM IOAS (translating as the IOAS did), its SELFTEST vIOMMU, a vDEVICE per
    device named by its guest devfn, and a second device of the same IOMMU on the same
    stage 2."""
    with Machine(mem_size=64 * MiB) as machine, Iommufd() as iommufd:
        region = machine.memory.region_for(0x0100_0000, 16 * MiB)
        ram = region.host_addr + 0x0100_0000 - region.gpa
        ioas = iommufd.alloc_ioas()
        ioas.map(0x0100_0000, ram, 16 * MiB)  # inside the mock's aperture
        first, second = MockDevice(ioas, name="first"), MockDevice(ioas, name="second")
        nesting = Nesting(ioas, first, can_nest(first))
        for devfn, device in ((0x18, first), (0x20, second)):
            nesting.add(device, can_nest(device))
            assert device.attached is nesting.parent
            assert nesting.identify(device, devfn).virt_id == devfn
        assert nesting.parent.flags == uapi.IommuHwptAllocFlag.ALLOC_NEST_PARENT
        assert nesting.viommu is not None
        assert nesting.viommu.viommu_type == uapi.IommuViommuType.SELFTEST
        assert mock.maps(iommufd, nesting.parent.id, 0x0100_0000, 16 * MiB, ram)
        kinds = [o.kind for o in iommufd.objects()]
        assert kinds.count("vdevice") == 2 and kinds.count("viommu") == 1
