"""PCI functions driven without KVM, over the recording fakes of `fakes`: bus 0 with the host
bridge and pyvmm's PCI test device (`Pci`); a virtio-pci device on a machine of fakes
(`DeviceBench`, which gives the device what `pyvmm.machine.host.DeviceHost` names, and RAM and
PCI bus 0 besides), with `HostDriver` playing the guest's driver through its registers and its
rings in that RAM (`virtio_device` builds the three); and `put_desc`, which writes a
descriptor of a virtqueue's table."""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Iterator

from fakes import FakeGsi, FakeVm, RecordingSlots

from pyvmm.devices.pci.bus import PciBus
from pyvmm.devices.pci.device import PCI_COMMAND, PCI_COMMAND_MASTER
from pyvmm.devices.pci.host import ConfigPorts, HostBridge
from pyvmm.devices.pci.testdev import PciTestDevice
from pyvmm.devices.virtio import pci as vpci
from pyvmm.devices.virtio import pci_common, pci_layout
from pyvmm.devices.virtio.backend import VIRTIO_F_VERSION_1, VirtioBackend
from pyvmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.machine.address_space import AddressSpace
from pyvmm.machine.bus import Bus
from pyvmm.machine.dma import IdentityDma
from pyvmm.machine.memory import GuestMemory, MemoryRegion, RamRegion, RegionKind

MiB = 1 << 20


class Pci:
    """Bus 0 with the host bridge and the test device in slot 3, over recording KVM slots."""

    def __init__(self) -> None:
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.slots = RecordingSlots()
        self.space = AddressSpace(self.slots, 16)
        self.space.add(RamRegion(0, 16 * MiB, name="ram"))
        self.bus = PciBus(
            self.pio, self.mmio, self.space, (0xC000_0000, 0xE000_0000), (0xC000, 0x10000)
        )
        self.bus.plug(HostBridge(), slot=0)
        self.dev = PciTestDevice()
        self.bus.plug(self.dev, slot=3)
        self.ports = ConfigPorts(self.bus, lambda: None)

    def cf8(self, slot: int, reg: int) -> None:
        self.ports.write(0, 4, 0x8000_0000 | slot << 11 | reg)

    def device_regions(self) -> list[MemoryRegion]:
        return self.space.regions(RegionKind.DEVICE)

    def close(self) -> None:
        self.bus.close()
        self.space.memory.close()


class DeviceBench:
    """A bench to plug a device into: what it is given (a DeviceHost: the VM, GSI routing, the
    DMA view of RAM), and what the test drives it through (RAM, and PCI bus 0, whose BARs land
    in an address space over the fake VM)."""

    def __init__(self) -> None:
        self.vm = FakeVm()
        self.address_space = AddressSpace(self.vm, 32)
        self.memory = self.address_space.memory
        self.address_space.add(RamRegion(0, 4 * MiB))
        self.dma = IdentityDma(self.memory)
        self.gsi = FakeGsi()
        self.mmio = Bus("mmio")
        self.pci = PciBus(
            Bus("pio"), self.mmio, self.address_space, (0xC000_0000, 0xE000_0000), (0xC000, 0x10000)
        )

    def close(self) -> None:
        self.pci.close()
        self.memory.close()


class HostDriver:
    """A virtio driver on the host side of the fake machine: rings in its RAM, registers through
    the device's BAR and config-space handlers."""

    RINGS = 0x100000  # queue i's rings at RINGS + i * 0x10000

    def __init__(self, machine: DeviceBench, device: vpci.VirtioPciDevice) -> None:
        self.machine = machine
        self.device = device
        self.mem = machine.memory
        self.sizes: dict[int, int] = {}
        self.avail: dict[int, int] = {}
        self.free: dict[int, int] = {}

    def read(self, field: str) -> int:
        offset, size = self._field(field)
        return self.device.bar_read(0, offset, size)

    def write(self, field: str, value: int) -> None:
        offset, size = self._field(field)
        self.device.bar_write(0, offset, size, value)

    @staticmethod
    def _field(name: str) -> tuple[int, int]:
        return next((o, s) for o, s, n in pci_common._COMMON_FIELDS if n == name)

    def negotiate(self, features: int = VIRTIO_F_VERSION_1) -> bool:
        self.write("device_status", 0)
        self.write("device_status", pci_common.STATUS_ACKNOWLEDGE | pci_common.STATUS_DRIVER)
        for select_ in (0, 1):
            self.write("driver_feature_select", select_)
            self.write("driver_feature", (features >> (32 * select_)) & 0xFFFFFFFF)
        self.write("device_status", pci_common.STATUS_FEATURES_OK)
        return bool(self.read("device_status") & pci_common.STATUS_FEATURES_OK)

    def rings(self, index: int) -> tuple[int, int, int]:
        base = self.RINGS + index * 0x10000
        return base, base + 0x4000, base + 0x8000

    def setup_queue(self, index: int, size: int = 8, vector: int = 0) -> None:
        desc, avail, used = self.rings(index)
        self.mem.write(desc, bytes(0xC000))
        self.write("queue_select", index)
        self.write("queue_size", size)
        self.write("queue_msix_vector", vector)
        self.write("queue_desc", desc)
        self.write("queue_driver", avail)
        self.write("queue_device", used)
        self.write("queue_enable", 1)
        self.sizes[index], self.avail[index], self.free[index] = size, 0, 0

    def enable_msix(self) -> None:
        cap = self.device.msix.capability.offset
        for v in range(self.device.msix.vectors):
            self.device.bar_write(0, pci_layout.MSIX_TABLE_OFFSET + 16 * v, 4, 0xFEE0_0000)
            self.device.bar_write(0, pci_layout.MSIX_TABLE_OFFSET + 16 * v + 8, 4, 0x40 + v)
            self.device.bar_write(0, pci_layout.MSIX_TABLE_OFFSET + 16 * v + 12, 4, 0)
        self.device.config_write(cap + 2, 2, 0x8000)

    def start(self, *queues: int) -> None:
        command = self.device.config_read(PCI_COMMAND, 2)
        self.device.config_write(PCI_COMMAND, 2, command | PCI_COMMAND_MASTER)
        assert self.negotiate()
        self.enable_msix()
        for index in queues:
            self.setup_queue(index)
        self.write("device_status", pci_common.STATUS_DRIVER_OK)

    def post(self, index: int, buffers: list[tuple[int, int, bool]]) -> int:
        desc = self.rings(index)[0]
        size = self.sizes[index]
        head = self.free[index]
        for n, (addr, length, writable) in enumerate(buffers):
            slot = (head + n) % size
            flags = VIRTQ_DESC_F_WRITE if writable else 0
            flags |= VIRTQ_DESC_F_NEXT if n + 1 < len(buffers) else 0
            put_desc(self.mem, desc, slot, addr, length, flags, (slot + 1) % size)
        self.free[index] = (head + len(buffers)) % size
        self.publish(index, head)
        return head

    def publish(self, index: int, head: int) -> None:
        avail = self.rings(index)[1]
        self.mem.write(
            avail + 4 + 2 * (self.avail[index] % self.sizes[index]), struct.pack("<H", head)
        )
        self.avail[index] = (self.avail[index] + 1) & 0xFFFF
        self.mem.write(avail + 2, struct.pack("<H", self.avail[index]))

    def notify(self, index: int) -> None:
        self.device.bar_write(
            0, pci_layout.NOTIFY_OFFSET + pci_layout.NOTIFY_MULTIPLIER * index, 2, index
        )

    def used(self, index: int) -> list[tuple[int, int]]:
        _, _, used = self.rings(index)
        count = struct.unpack("<H", self.mem.read(used + 2, 2))[0]
        return [struct.unpack("<II", self.mem.read(used + 4 + 8 * i, 8)) for i in range(count)]

    def wait_used(self, index: int, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while len(used := self.used(index)) < count:
            assert time.monotonic() < deadline, f"queue {index}: {len(used)} of {count} used"
            time.sleep(0.002)
        return used

    def wait_status(self, bits: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.read("device_status") & bits:
            assert time.monotonic() < deadline, f"status never got {bits:#x}"
            time.sleep(0.002)


@contextlib.contextmanager
def virtio_device(
    backend: VirtioBackend | None = None,
) -> Iterator[tuple[DeviceBench, vpci.VirtioPciDevice, HostDriver]]:
    machine = DeviceBench()
    try:
        device = vpci.VirtioPciDevice(machine, backend or VirtioRng())  # type: ignore[arg-type]
        machine.pci.plug(device)
        yield machine, device, HostDriver(machine, device)
    finally:
        machine.close()


def put_desc(
    mem: GuestMemory,
    table: int,
    index: int,
    addr: int,
    length: int,
    flags: int = 0,
    next_index: int = 0,
) -> None:
    mem.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, next_index))
