"""Driving QEMU's `edu` device from lab tests, through a VFIO device fd.

edu's registers (BAR0, 32-bit unless noted): 0x00 id 0x010000ed; 0x04 liveness (reads back the
complement); 0x24 interrupt status; 0x60 raise interrupt; 0x64 acknowledge; 0x80/0x88/0x90 DMA
source, destination, count (64-bit); 0x98 DMA command (bit 0 start, bit 1 edu-to-RAM, clears
when done). Its DMA buffer is at 0x40000 in its own address space; bus addresses must fit in
28 bits.
"""

from __future__ import annotations

import ctypes
import struct
import time

from pyvmm.uapi import vfio as uapi
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.sysfs import PciDevice, Sysfs

EDU_ID = 0x010000ED
EDU_BUFFER = 0x40000
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2


def lab_pci_device(lab_devices: dict[str, str], sysfs: Sysfs, name: str) -> PciDevice:
    """The lab's `name` device (edu, nvme, ...) as sysfs shows it, bound to vfio-pci."""
    device = sysfs.pci_device(lab_devices[name])
    assert device.iommu_group and device.cdev, f"{name} has no IOMMU group or VFIO cdev: {device}"
    return device


def enable_dma(device: VfioDevice) -> None:
    """Memory decoding and bus mastering on, in the device's own config space."""
    config = device.region(uapi.VfioPciRegion.CONFIG)
    command = struct.unpack("<H", device.read(config, PCI_COMMAND, 2))[0]
    command |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
    device.write(config, PCI_COMMAND, struct.pack("<H", command))


def bar0(device: VfioDevice) -> int:
    """The address of edu's BAR0 mmapped here: real 4-byte loads and stores."""
    region = device.region(uapi.VfioPciRegion.BAR0)
    return device.mmap(region, 0, region.size).addr


def read32(addr: int, offset: int) -> int:
    return ctypes.c_uint32.from_address(addr + offset).value


def write32(addr: int, offset: int, value: int) -> None:
    ctypes.c_uint32.from_address(addr + offset).value = value


def write64(addr: int, offset: int, value: int) -> None:
    ctypes.c_uint64.from_address(addr + offset).value = value


def dma(addr: int, src: int, dst: int, count: int, to_ram: bool) -> None:
    """One DMA of edu's engine (BAR0 at `addr`), waited for."""
    write64(addr, 0x80, src)
    write64(addr, 0x88, dst)
    write64(addr, 0x90, count)
    write32(addr, 0x98, 1 | (2 if to_ram else 0))
    deadline = time.monotonic() + 10
    while read32(addr, 0x98) & 1:
        assert time.monotonic() < deadline, "edu DMA never finished"
        time.sleep(0.01)
