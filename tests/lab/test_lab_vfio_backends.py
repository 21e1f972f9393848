"""Both VFIO backends against the lab's kernel and IOMMU, each test run once through the legacy
container (group + device fd) and once through iommufd (cdev bound to /dev/iommu, attached to an
IOAS), driving QEMU's `edu` device: config space, BAR0 through the fd and through mmap, DMA into
and out of memory the backend maps (and not after the unmap), INTx with an unmask eventfd, MSI.
(A machine's shared IOMMU context is in test_lab_iommu_context.py.)

edu's registers are described in lab_edu.py.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Iterator

import pytest
from lab_edu import (
    EDU_BUFFER,
    EDU_ID,
    bar0,
    dma,
    enable_dma,
    lab_pci_device,
    read32,
    write32,
)

from pyvmm.kvm.eventfd import EventFd
from pyvmm.kvm.mmap import Mapping
from pyvmm.uapi import vfio as uapi
from pyvmm.vfio.backends import BACKENDS, open_context
from pyvmm.vfio.container import Container, Group
from pyvmm.vfio.device import RegionFlag, VfioDevice
from pyvmm.vfio.dma_space import DmaSpace
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.iommufd.objects import Iommufd, VfioBinding, open_cdev
from pyvmm.vfio.sysfs import Sysfs

pytestmark = pytest.mark.lab

IOVA = 0x100000
DMA_SIZE = 0x10000


@pytest.fixture(params=sorted(BACKENDS))
def edu(
    request: pytest.FixtureRequest, lab_devices: dict[str, str], sysfs: Sysfs
) -> Iterator[tuple[DmaSpace, VfioDevice]]:
    """edu opened through one backend, with memory decoding and bus mastering on."""
    with open_context(request.param) as context:
        vfio_device = context.open_pci(lab_pci_device(lab_devices, sysfs, "edu"))
        enable_dma(vfio_device)
        yield context.dma, vfio_device


def wait_for(event: EventFd, timeout: float = 5) -> int:
    ready, _, _ = select.select([event.fd], [], [], timeout)
    return event.read() if ready else 0


def test_device_info_config_space_and_regions(edu: tuple[DmaSpace, VfioDevice]) -> None:
    space, device = edu
    info = device.info()
    assert info.flags & uapi.VfioDeviceFlag.PCI  # (no RESET: edu has neither FLR nor PM reset)
    assert info.num_regions >= uapi.VfioPciRegion.CONFIG + 1
    assert info.num_irqs >= uapi.VfioPciIrq.MSIX + 1
    config = device.region(uapi.VfioPciRegion.CONFIG)
    assert struct.unpack("<HH", device.read(config, 0, 4)) == (0x1234, 0x11E8)
    bar = device.region(uapi.VfioPciRegion.BAR0)
    assert bar.size == 1 << 20
    assert bar.flags & RegionFlag.MMAP and bar.mmap_areas == ((0, 1 << 20),)
    assert device.region(uapi.VfioPciRegion.BAR1).size == 0  # edu has one BAR
    assert any(start <= IOVA < IOVA + DMA_SIZE <= last + 1 for start, last in space.iova_ranges())
    with pytest.raises(VfioError, match="outside region"):
        device.read(config, config.size - 2, 4)


def test_bar0_through_the_fd_and_through_mmap(edu: tuple[DmaSpace, VfioDevice]) -> None:
    _, device = edu
    region = device.region(uapi.VfioPciRegion.BAR0)
    assert struct.unpack("<I", device.read(region, 0, 4))[0] == EDU_ID
    addr = bar0(device)
    assert read32(addr, 0) == EDU_ID
    write32(addr, 0x04, 0x12345678)
    assert read32(addr, 0x04) == 0x12345678 ^ 0xFFFFFFFF
    device.write(region, 0x04, struct.pack("<I", 0x0F0F0F0F))
    assert read32(addr, 0x04) == 0xF0F0F0F0


def test_dma_reaches_only_what_the_container_maps(edu: tuple[DmaSpace, VfioDevice]) -> None:
    space, device = edu
    addr = bar0(device)
    with Mapping(DMA_SIZE, flags=0x02) as memory:  # MAP_PRIVATE anonymous
        pattern = bytes(range(256)) * 4
        memory.view[: len(pattern)] = pattern
        space.map(IOVA, memory.addr, DMA_SIZE)
        dma(addr, IOVA, EDU_BUFFER, len(pattern), to_ram=False)  # RAM -> edu
        dma(addr, EDU_BUFFER, IOVA + 0x1000, len(pattern), to_ram=True)  # edu -> RAM
        assert bytes(memory.view[0x1000 : 0x1000 + len(pattern)]) == pattern
        assert space.unmap(IOVA, DMA_SIZE) == DMA_SIZE
        dma(addr, EDU_BUFFER, IOVA + 0x2000, len(pattern), to_ram=True)  # now an IOMMU fault
        assert bytes(memory.view[0x2000 : 0x2000 + len(pattern)]) == bytes(len(pattern))


def test_intx_signals_an_eventfd_and_is_unmasked_by_another(
    edu: tuple[DmaSpace, VfioDevice],
) -> None:
    _, device = edu
    addr = bar0(device)
    info = device.irq(uapi.VfioPciIrq.INTX)
    assert info.count == 1
    wanted = uapi.VfioIrqInfoFlag.EVENTFD | uapi.VfioIrqInfoFlag.AUTOMASKED
    assert info.flags & wanted == wanted
    with EventFd() as trigger, EventFd() as unmask:
        device.set_irq_eventfds(uapi.VfioPciIrq.INTX, [trigger.fd])
        device.set_irq_unmask_eventfd(uapi.VfioPciIrq.INTX, unmask.fd)
        for round_ in range(3):
            write32(addr, 0x60, 1)  # raise: INTx goes high
            assert wait_for(trigger) == 1, f"no interrupt in round {round_}"
            assert read32(addr, 0x24) == 1
            write32(addr, 0x64, 1)  # acknowledge: the line goes low
            unmask.signal()  # what KVM's resamplefd does at the guest's EOI
            time.sleep(0.05)
        device.disable_irqs(uapi.VfioPciIrq.INTX)
        write32(addr, 0x60, 1)
        assert wait_for(trigger, 0.5) == 0
        write32(addr, 0x64, 1)


def test_msi_signals_an_eventfd(edu: tuple[DmaSpace, VfioDevice]) -> None:
    _, device = edu
    addr = bar0(device)
    assert device.irq(uapi.VfioPciIrq.MSI).count >= 1
    with EventFd() as vector:
        device.set_irq_eventfds(uapi.VfioPciIrq.MSI, [vector.fd])
        try:
            for _ in range(3):
                write32(addr, 0x60, 1)
                assert wait_for(vector) == 1
                write32(addr, 0x64, 1)
        finally:
            device.disable_irqs(uapi.VfioPciIrq.MSI)


def test_mmap_outside_the_mmap_areas_is_refused(edu: tuple[DmaSpace, VfioDevice]) -> None:
    _, device = edu
    config = device.region(uapi.VfioPciRegion.CONFIG)
    with pytest.raises(VfioError, match="may not be mmap"):
        device.mmap(config, 0, 4096)


def test_group_errors_say_what_to_do(lab_devices: dict[str, str], sysfs: Sysfs) -> None:
    with pytest.raises(VfioError, match=r"/dev/vfio/999 does not exist; bind"):
        Group(999)
    group_number = lab_pci_device(lab_devices, sysfs, "edu").iommu_group
    with Group(group_number) as group:
        with pytest.raises(VfioError, match="add it to a container first"):
            group.open_device(lab_devices["edu"])
        with pytest.raises(VfioError, match=r"is busy: already open \(in this process"):
            Group(group_number)  # a group is opened once
        with Container() as container:
            container.add_group(group)
            with pytest.raises(VfioError, match="not a device of VFIO group"):
                group.open_device("0000:00:1f.7")


def test_iommufd_errors_say_what_to_do(lab_devices: dict[str, str], sysfs: Sysfs) -> None:
    with pytest.raises(VfioError, match=r"/dev/vfio/devices/vfio999 does not exist; bind"):
        open_cdev("vfio999")
    edu = lab_pci_device(lab_devices, sysfs, "edu")
    with Group(edu.iommu_group) as group, Container() as container:
        container.add_group(group)
        with (
            group.open_device(edu.bdf),
            Iommufd() as fd,
            open_cdev(edu.cdev) as cdev,
            pytest.raises(VfioError, match=r"in use, e\.g\. through its VFIO group"),
        ):
            VfioBinding(cdev, fd)


def test_iommufd_detach_then_attach_to_another_ioas(
    lab_devices: dict[str, str], sysfs: Sysfs
) -> None:
    edu = lab_pci_device(lab_devices, sysfs, "edu")
    with Iommufd() as fd, open_cdev(edu.cdev) as cdev:
        binding = VfioBinding(cdev, fd)
        assert binding.id > 0
        first, second = fd.alloc_ioas(), fd.alloc_ioas()
        binding.attach(first)
        with pytest.raises(VfioError, match=rf"ioas {first.id} is in use by device {binding.id}"):
            first.close()  # an IOAS in use cannot go
        binding.detach()
        binding.attach(second)
        first.close()
        first.close()  # once only: the id may already belong to something else
        assert second.iova_ranges()
        assert second.unmap(IOVA, DMA_SIZE) == 0  # nothing there: 0, as in the legacy backend


def test_reset_is_refused_for_a_device_without_one(edu: tuple[DmaSpace, VfioDevice]) -> None:
    _, device = edu
    with pytest.raises(VfioError, match="has no reset"):
        device.reset()


def test_a_container_takes_a_group_again_after_its_last_one_left(
    lab_devices: dict[str, str], sysfs: Sysfs
) -> None:
    """The kernel drops the container's IOMMU with its last group: it must be set again."""
    number = lab_pci_device(lab_devices, sysfs, "edu").iommu_group
    with Container() as container, Mapping(DMA_SIZE, flags=0x02) as memory:
        for _ in range(2):
            with Group(number) as group:
                container.add_group(group)
                container.map(IOVA, memory.addr, DMA_SIZE)
                assert container.unmap(IOVA, DMA_SIZE) == DMA_SIZE
        assert container.groups == []


def test_an_ioas_maps_a_memfd_by_file(lab_devices: dict[str, str], sysfs: Sysfs) -> None:
    """IOMMU_IOAS_MAP_FILE: the IOAS maps a memfd's pages (as guest RAM is mapped), and the
    device reads and writes the file's memory."""
    with open_context("iommufd") as context:
        device = context.open_pci(lab_pci_device(lab_devices, sysfs, "edu"))
        enable_dma(device)
        addr = bar0(device)
        memfd = os.memfd_create("map-file", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, DMA_SIZE)
            with Mapping(DMA_SIZE, memfd) as memory:
                assert context.ioas.map_file(IOVA, memfd, 0, DMA_SIZE)
                pattern = bytes(range(256)) * 4
                memory.view[: len(pattern)] = pattern
                dma(addr, IOVA, EDU_BUFFER, len(pattern), to_ram=False)
                dma(addr, EDU_BUFFER, IOVA + 0x1000, len(pattern), to_ram=True)
                assert os.pread(memfd, len(pattern), 0x1000) == pattern  # in the file itself
                assert context.ioas.unmap(IOVA, DMA_SIZE) == DMA_SIZE
        finally:
            os.close(memfd)
