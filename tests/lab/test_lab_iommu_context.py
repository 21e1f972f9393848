"""A machine's one IOMMU context, against the lab's kernel and IOMMU, through both backends:
two assigned devices (edu and an NVMe) share it, guest RAM is DMA-mapped at its guest-physical
addresses by following the machine's address space (and device memory is not), and the KVM-VFIO
device knows each group or cdev fd because the machine told it."""

from __future__ import annotations

import pytest
from lab_edu import EDU_BUFFER, bar0, dma, enable_dma, lab_pci_device

from pyvmm.board.machine import Machine
from pyvmm.kvm.mmap import Mapping
from pyvmm.machine.memory import MemoryRegion, RegionKind
from pyvmm.uapi.ioctl import IoctlError
from pyvmm.vfio.backends import BACKENDS
from pyvmm.vfio.container import ContainerContext
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.iommufd.backend import IommufdContext
from pyvmm.vfio.sysfs import Sysfs

pytestmark = pytest.mark.lab(devices=("nvme",))

MiB = 1 << 20
BACKENDS = sorted(BACKENDS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_assigned_devices_share_one_iommu_context(
    backend: str, lab_devices: dict[str, str], sysfs: Sysfs
) -> None:
    with Machine(mem_size=32 * MiB) as machine:
        context = machine.vfio(backend)
        edu = context.open_pci(lab_pci_device(lab_devices, sysfs, "edu"))
        nvme = context.open_pci(lab_pci_device(lab_devices, sysfs, "nvme"))
        assert machine.vfio() is context and machine.vfio(backend) is context
        other = "container" if backend == "iommufd" else "iommufd"
        with pytest.raises(Exception, match=f"use the {backend} backend"):
            machine.vfio(other)
        if isinstance(context, IommufdContext):
            # one IOAS: the kernel gave both devices the same page table on it
            hwpts = set(context.hwpt_ids.values())
            assert len(context.hwpt_ids) == 2 and len(hwpts) == 1, context.hwpt_ids
            files = [edu.fd, nvme.fd]
        else:
            assert isinstance(context, ContainerContext)
            assert len(context.container.groups) == 2  # two IOMMU groups, one container
            files = [group.fd for group in context.groups.values()]
        # The machine told KVM about each file: KVM refuses to be told again.
        for fd in files:
            with pytest.raises(IoctlError, match=r"KVM_SET_DEVICE_ATTR failed: File exists"):
                machine.vm.vfio_device.add(fd)
        with pytest.raises(VfioError, match="already assigned"):
            context.open_pci(lab_pci_device(lab_devices, sysfs, "edu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_guest_ram_follows_the_address_space_and_device_memory_does_not(
    backend: str, lab_devices: dict[str, str], sysfs: Sysfs
) -> None:
    """edu, assigned to a machine, DMAs at guest-physical addresses: into guest RAM (mapped
    when it was assigned), but not into device memory placed in the guest's map."""
    with Machine(mem_size=32 * MiB) as machine, Mapping(64 * 1024) as bar_memory:
        edu = machine.vfio(backend).open_pci(lab_pci_device(lab_devices, sysfs, "edu"))
        enable_dma(edu)
        regs = bar0(edu)
        pattern = bytes(range(255, -1, -1)) * 2
        machine.memory.write(0x100000, pattern)
        dma(regs, 0x100000, EDU_BUFFER, len(pattern), to_ram=False)  # guest RAM -> edu
        dma(regs, EDU_BUFFER, 0x101000, len(pattern), to_ram=True)  # edu -> guest RAM
        assert machine.memory.read(0x101000, len(pattern)) == pattern
        device_region = MemoryRegion(
            RegionKind.DEVICE, 0x0800_0000, bar_memory.size, host_addr=bar_memory.addr, name="bar"
        )
        machine.address_space.add(device_region)  # in the guest's map, not for device DMA
        dma(regs, EDU_BUFFER, 0x0800_0000, len(pattern), to_ram=True)  # an IOMMU fault
        assert bytes(bar_memory.view[: len(pattern)]) == bytes(len(pattern))
        machine.address_space.remove(device_region)
        dma(regs, EDU_BUFFER, 0x102000, len(pattern), to_ram=True)  # RAM still mapped
        assert machine.memory.read(0x102000, len(pattern)) == pattern
