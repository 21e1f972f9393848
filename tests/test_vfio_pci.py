"""The virtualized PCI function of a passed-through device, over a recording fake of its VFIO
device fd (no kernel; the lab drives real devices): what the guest sees of config space, what
reaches the device, how its BARs are mapped, and that no guest traffic breaks the rules
(hypothesis)."""

from __future__ import annotations

import errno
import logging
import struct
import time
from collections.abc import Iterator

import pytest
from fakes import FakeGsi, RecordingSlots
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyvmm.devices.pci.bus import PciBus
from pyvmm.devices.pci.device import PCI_BASE_ADDRESS_0, PCI_COMMAND, BarKind
from pyvmm.kvm.mmap import Mapping
from pyvmm.machine import layout
from pyvmm.machine.address_space import AddressSpace
from pyvmm.machine.bus import Bus
from pyvmm.machine.memory import RamRegion, RegionKind
from pyvmm.machine.state import StateError, from_plain, to_plain
from pyvmm.uapi import vfio as uapi
from pyvmm.uapi.ioctl import IoctlError
from pyvmm.vfio.device import DeviceInfo, IrqInfo, Region
from pyvmm.vfio.passthrough.function import VfioPciFunction, VfioPciFunctionState
from pyvmm.vfio.passthrough.interrupts import IrqMode

MiB = 1 << 20
F = uapi.VfioRegionInfoFlag
PM, MSI, EXP, MSIX, VNDR = 0xC8, 0xD0, 0xE0, 0xA0, 0x40
# What pyvmm lets the guest change on the device: the command bits, PM's power state, PCIe
# device control and control 2 (vfio-pci drops writes to the status registers).
DEVICE_WRITABLE = {
    PCI_COMMAND: 0x47,
    PCI_COMMAND + 1: 0x05,
    PM + 4: 0x03,
    EXP + 8: 0xFF,
    EXP + 9: 0xFF,
    EXP + 0x28: 0xFF,
    EXP + 0x29: 0xFF,
}


def e1000e_like_config() -> bytearray:
    """An 82574L's config space as VFIO shows it: BARs, PM, MSI, PCIe, MSI-X, a vendor
    capability and an extended capability (AER)."""
    config = bytearray(4096)
    struct.pack_into("<HHHH", config, 0, 0x8086, 0x10D3, 0, 0x0010)  # IDs, command, status
    config[8:12] = bytes((0, 0, 0, 2))  # revision, class 02 00 00
    config[0x0E] = 0x80  # multifunction bit: pyvmm presents a single function
    struct.pack_into("<IIII", config, 0x10, 0, 0, 0xC001, 0)  # BAR2 is I/O
    struct.pack_into("<HH", config, 0x2C, 0x8086, 0xA01F)
    config[0x34] = VNDR
    config[0x3D] = 1  # INTA#
    config[VNDR : VNDR + 4] = bytes((0x09, PM, 4, 0))  # vendor-specific: hidden
    config[PM : PM + 8] = bytes((0x01, MSI, 0x22, 0xC8, 0, 0, 0, 0))
    config[MSI : MSI + 4] = bytes((0x05, EXP, 0x80, 0))  # MSI, 64-bit, 1 vector
    config[EXP : EXP + 4] = bytes((0x10, MSIX, 0x02, 0))  # PCIe v2 endpoint
    struct.pack_into("<I", config, EXP + 4, 0x8FC0)  # device capabilities
    struct.pack_into("<I", config, EXP + 0xC, 0x0003_FC41)  # a host link: x4 2.5 GT/s
    config[MSIX : MSIX + 2] = bytes((0x11, 0))
    struct.pack_into("<HII", config, MSIX + 2, 4, 3, 3 | 0x2000)  # 5 vectors, table/PBA BAR3
    struct.pack_into("<I", config, 0x100, 0x0001 | 1 << 16)  # AER, version 1, last
    return config


class FakeDevice:
    """A VFIO device fd: regions (BAR0 128 KiB mappable, BAR1 flash 128 KiB not, BAR2 I/O 32
    bytes, BAR3 16 KiB MSI-X with sparse mmap areas between and above the table and PBA
    pages, config 4 KiB), IRQ infos;
    it records every region write and SET_IRQS."""

    name = "fake0"
    SIZES = {0: 0x20000, 1: 0x20000, 2: 0x20, 3: 0x4000}

    def __init__(self, *, msix_vectors: int = 5, msi_vectors: int = 1) -> None:
        self.config = e1000e_like_config()
        self.bars = {index: bytearray(size) for index, size in self.SIZES.items()}
        self.config_writes: list[tuple[int, bytes, bytes]] = []  # offset, before, written
        self.irq_sets: list[tuple[str, int, int]] = []
        self.mode = "none"
        self.resets = 0
        self.counts = {0: 1, 1: msi_vectors, 2: msix_vectors}  # what VFIO offers per index
        self.msi_available = msi_vectors  # what the host can allocate
        self.refuse_unmask_eventfd = False
        self.unmasks = 0
        self.on_config_write = lambda offset, data: None
        self._mappings: list[Mapping] = []

    def info(self) -> DeviceInfo:
        return DeviceInfo(uapi.VfioDeviceFlag.PCI | uapi.VfioDeviceFlag.RESET, 9, 5)

    def region(self, index: int) -> Region:
        if index == uapi.VfioPciRegion.CONFIG:
            return Region(index, F.READ | F.WRITE, 4096, 7 << 40, ())
        size = self.SIZES.get(index, 0)
        areas = {0: ((0, size),), 3: ((0x1000, 0x1000), (0x3000, 0x1000))}.get(index, ())
        flags = F.READ | F.WRITE | (F.MMAP if areas else 0) if size else F(0)
        return Region(index, flags, size, index << 40, areas)

    def irq(self, index: int) -> IrqInfo:
        return IrqInfo(index, uapi.VfioIrqInfoFlag.EVENTFD, self.counts.get(index, 0))

    def read(self, region: Region, offset: int, size: int) -> bytes:
        data = self.config if region.index == uapi.VfioPciRegion.CONFIG else self.bars[region.index]
        assert offset >= 0 and offset + size <= len(data), (region.index, offset, size)
        return bytes(data[offset : offset + size])

    def write(self, region: Region, offset: int, data: bytes) -> None:
        if region.index != uapi.VfioPciRegion.CONFIG:
            self.bars[region.index][offset : offset + len(data)] = data
            return
        before = bytes(self.config[offset : offset + len(data)])
        self.config_writes.append((offset, before, bytes(data)))
        self.on_config_write(offset, bytes(data))
        for i, byte in enumerate(data):  # the device takes the bits it lets be written
            pos = offset + i
            writable = DEVICE_WRITABLE.get(pos, 0)
            self.config[pos] = (self.config[pos] & ~writable) | (byte & writable)

    def mmap(self, region: Region, offset: int, size: int) -> Mapping:
        assert any(a <= offset and offset + size <= a + s for a, s in region.mmap_areas)
        mapping = Mapping(size)
        self._mappings.append(mapping)
        return mapping

    def set_irq_eventfds(self, index: int, fds: list[int], start: int = 0) -> int:
        assert self.mode == "none", f"{self.mode} still on when index {index} is set"
        if len(fds) > self.counts[index]:
            raise IoctlError("VFIO_DEVICE_SET_IRQS", errno.EINVAL)
        if index == 1 and len(fds) > self.msi_available:
            return self.msi_available  # as vfio_msi_enable: none enabled, this many possible
        self.mode = {0: "intx", 1: "msi", 2: "msix"}[index]
        self.irq_sets.append(("trigger", index, len(fds)))
        return 0

    def set_irq_unmask_eventfd(self, index: int, fd: int) -> None:
        if self.refuse_unmask_eventfd:
            raise IoctlError("VFIO_DEVICE_SET_IRQS", errno.ENOTTY)
        self.irq_sets.append(("unmask", index, 1))

    def disable_irqs(self, index: int) -> None:
        assert self.mode == {0: "intx", 1: "msi", 2: "msix"}[index]
        self.mode = "none"

    def unmask_irq(self, index: int) -> None:
        self.unmasks += 1

    def reset(self) -> None:
        self.resets += 1

    def close(self) -> None:
        for mapping in self._mappings:
            mapping.close()


class FakeKvm(RecordingSlots):
    def __init__(self) -> None:
        super().__init__()
        self.irqfds: dict[int, tuple[int, int | None]] = {}  # eventfd -> (gsi, resamplefd)

    def irqfd(self, fd: int, gsi: int, resamplefd: int | None = None) -> None:
        assert fd not in self.irqfds
        self.irqfds[fd] = (gsi, resamplefd)

    def irqfd_remove(self, fd: int, gsi: int) -> None:
        assert self.irqfds.pop(fd)[0] == gsi


class Guest:
    """Bus 0 with the fake device passed through in slot 4, over RAM at 0-16 MiB."""

    def __init__(self, device: FakeDevice | None = None) -> None:
        self.vm = FakeKvm()
        self.gsi = FakeGsi()
        self.space = AddressSpace(self.vm, 32)
        self.space.add(RamRegion(0, 16 * MiB))
        self.mmio, self.pio = Bus("mmio"), Bus("pio")
        self.bus = PciBus(
            self.pio,
            self.mmio,
            self.space,
            (layout.PCI_MMIO_BASE, layout.PCI_MMIO_BASE + layout.PCI_MMIO_SIZE),
            (layout.PCI_IO_BASE, layout.PCI_IO_BASE + layout.PCI_IO_SIZE),
        )
        self.device = device or FakeDevice()
        self.function = VfioPciFunction(self, self.device, "vfio fake0")  # type: ignore[arg-type]
        self.bus.plug(self.function, slot=4)

    def read(self, offset: int, size: int) -> int:
        return self.bus.config_read(4 << 3, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.bus.config_write(4 << 3, offset, size, value)

    def caps(self) -> list[tuple[int, int]]:
        found, offset = [], self.read(0x34, 1)
        while offset:
            found.append((self.read(offset, 1), offset))
            offset = self.read(offset + 1, 1)
        return found

    def close(self) -> None:
        self.bus.close()
        self.device.close()
        self.space.memory.close()


@pytest.fixture
def guest() -> Iterator[Guest]:
    machine = Guest()
    yield machine
    machine.close()


def test_the_guest_sees_the_devices_identity_and_only_the_capabilities_pyvmm_virtualizes(
    guest: Guest,
) -> None:
    assert guest.read(0, 4) == 0x10D3_8086 and guest.read(0x0B, 1) == 0x02
    assert guest.read(0x0E, 1) == 0  # single function
    assert guest.caps() == [(0x01, PM), (0x05, MSI), (0x10, EXP), (0x11, MSIX)]
    assert guest.read(VNDR, 4) == 0  # the vendor capability's bytes are hidden
    assert guest.read(0x100, 4) == 0  # so are the extended capabilities
    assert guest.read(EXP + 0xC, 4) == 0x11 and guest.read(EXP + 0x12, 2) == 0x11  # x1 link
    assert guest.read(0x30, 4) == 0  # no ROM
    assert guest.read(0x3C, 1) == layout.pci_intx_gsi(4, 1)
    assert guest.read(MSIX + 2, 2) & 0x7FF == 4  # five MSI-X vectors, as the device has
    assert "own state" in guest.function.state_caveat  # a snapshot says what it leaves out
    guest.write(0x06, 2, 0xFFFF)  # status: read-only, nothing reaches the device
    assert guest.device.config_writes == [] or all(o != 6 for o, *_ in guest.device.config_writes)


def test_bars_are_sized_from_the_regions_and_mapped_around_the_msix_table(guest: Guest) -> None:
    function = guest.function
    assert {i: (b.kind, b.size) for i, b in function.bars.items()} == {
        0: (BarKind.MEM32, 0x20000),
        1: (BarKind.MEM32, 0x20000),
        2: (BarKind.IO, 0x20),
        3: (BarKind.MEM32, 0x4000),
    }
    base = function.bar_address(0)
    guest.write(PCI_BASE_ADDRESS_0, 4, 0xFFFF_FFFF)  # sizing, as a guest does
    assert guest.read(PCI_BASE_ADDRESS_0, 4) == 0xFFFE_0000
    guest.write(PCI_BASE_ADDRESS_0, 4, base)
    regions = {r.name: r for r in guest.space.regions(RegionKind.DEVICE)}
    assert sorted(regions) == [
        "vfio fake0 BAR0+0x0",
        "vfio fake0 BAR3+0x1000",
        "vfio fake0 BAR3+0x3000",
    ]
    bar3 = function.bar_address(3)
    assert regions["vfio fake0 BAR3+0x1000"].gpa == bar3 + 0x1000
    assert regions["vfio fake0 BAR3+0x3000"].gpa == bar3 + 0x3000
    # the table page and the PBA page are trapped and emulated, never the device's
    window = guest.mmio.find(bar3)
    window.device.write(0, 4, 0xFEE0_0000)
    assert function.bar_read(3, 0, 4) == 0xFEE0_0000 and guest.device.bars[3][:4] == bytes(4)
    assert guest.mmio.find(bar3 + 0x2000) is not None
    # BAR1 has no mmap area: trapped whole, through to the device
    bar1 = function.bar_address(1)
    guest.mmio.find(bar1 + 0x100).device.write(0x100, 4, 0x1234_5678)
    assert guest.device.bars[1][0x100:0x104] == struct.pack("<I", 0x1234_5678)


def test_msi_and_msix_switch_the_devices_interrupt_index(guest: Guest) -> None:
    device, function = guest.device, guest.function
    assert device.mode == "intx" and ("unmask", 0, 1) in device.irq_sets
    ((_, (gsi, resample)),) = guest.vm.irqfds.items()
    assert gsi == layout.pci_intx_gsi(4, 1) and resample is not None
    guest.write(MSI + 4, 4, 0xFEE0_0000)
    guest.write(MSI + 0xC, 2, 0x41)
    guest.write(MSI + 2, 2, 1)  # MSI on
    assert device.mode == "msi"
    assert function.msi.eventfds[0].fd in guest.vm.irqfds
    guest.write(MSIX + 2, 2, 0x8000)  # MSI-X on wins over MSI
    assert device.mode == "msix" and device.irq_sets[-1] == ("trigger", 2, 5)
    guest.write(MSIX + 2, 2, 0)  # off: back to MSI, still on
    assert device.mode == "msi"
    guest.write(MSI + 2, 2, 0)
    assert device.mode == "intx"


WORD = st.integers(0, 0xFFFF)
DWORD = st.integers(0, 0xFFFF_FFFF)
OPS = st.one_of(
    st.tuples(st.just("config"), st.integers(0, 0xFFF), st.sampled_from([1, 2, 4]), DWORD),
    st.tuples(st.just("config"), st.sampled_from([4, 5, 6, 7, 0x3C]), st.just(1), DWORD),
    st.tuples(st.just("config"), st.sampled_from([4, 6]), st.just(2), WORD),
    st.tuples(st.just("bar"), st.integers(0, 5), st.just(4), DWORD),
    st.tuples(st.just("config"), st.sampled_from([MSIX + 2, MSI + 2]), st.just(2), WORD),
    st.tuples(
        st.just("config"),
        st.sampled_from([PM + 4, MSI + 4, MSI + 8, MSI + 0xC, EXP + 8, EXP + 10, EXP + 0x10]),
        st.sampled_from([2, 4]),
        DWORD,
    ),
    st.tuples(st.just("table"), st.integers(0, 5 * 16 - 1), st.sampled_from([1, 2, 4, 8]), DWORD),
    # a whole vector's entry (address, data, mask bit), or MSI-X's enable and function mask
    st.tuples(st.just("vector"), st.integers(0, 4), st.just(4), st.integers(0, 1)),
    st.tuples(
        st.just("config"),
        st.just(MSIX + 2),
        st.just(2),
        st.sampled_from([0, 0x4000, 0x8000, 0xC000]),
    ),
    st.tuples(st.just("pba"), st.integers(0, 7), st.sampled_from([1, 4, 8]), st.just(0)),
)


def check_rules(guest: Guest) -> None:
    function = guest.function
    # what reached the device's config space: only bits it lets the guest change, and only
    # at the registers pyvmm passes through
    for offset, before, written in guest.device.config_writes:
        for i, (old, new) in enumerate(zip(before, written, strict=True)):
            allowed = DEVICE_WRITABLE.get(offset + i, 0)
            assert (old ^ new) & ~allowed == 0, f"forbidden write at {offset + i:#x}"
    ram = guest.space.regions(RegionKind.RAM)
    for region in guest.space.regions(RegionKind.DEVICE):
        assert any(lo <= region.gpa and region.end <= hi for lo, hi in guest.bus.memory_windows)
        assert not any(r.gpa < region.end and region.gpa < r.end for r in ram)
    msix_control = guest.read(MSIX + 2, 2)
    msix_on, msi_on = bool(msix_control & 0x8000), bool(guest.read(MSI + 2, 2) & 1)
    expected = IrqMode.MSIX if msix_on else IrqMode.MSI if msi_on else IrqMode.INTX
    assert function.interrupts.mode is expected
    assert guest.device.mode == expected.value
    for vector in range(5):
        control = function.bar_read(3, 16 * vector + 12, 4)
        live = msix_on and not msix_control & 0x4000 and not control & 1
        assert (function.msix.eventfds[vector].fd in guest.vm.irqfds) == live, vector
    msi_live = msi_on  # one vector, not maskable
    assert (function.msi.eventfds[0].fd in guest.vm.irqfds) == msi_live


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=60))
@example(  # MSI-X on, a vector unmasked then masked again, MSI-X masked as a whole, off
    [
        ("config", MSIX + 2, 2, 0x8000),
        ("vector", 1, 4, 0),
        ("vector", 1, 4, 1),
        ("vector", 2, 4, 0),
        ("config", MSIX + 2, 2, 0xC000),
        ("config", MSIX + 2, 2, 0),
    ]
)
def test_no_guest_traffic_breaks_the_rules(ops) -> None:
    """Random config-space writes (BARs, command, status, every capability), BAR
    reprogramming, MSI-X table and PBA traffic, each followed by the rules being checked: no
    exception; no write the rules forbid reaches the device; no memory slot outside the PCI
    windows or over RAM; the device signals on the index the guest enabled; every live MSI
    and MSI-X vector, and only those, has an irqfd."""
    guest = Guest()
    try:
        function = guest.function
        for kind, offset, size, value in ops:
            value &= (1 << (8 * size)) - 1
            if kind == "config":
                guest.write(offset, size, value)
                guest.read(offset, size)
            elif kind == "bar":
                guest.write(PCI_BASE_ADDRESS_0 + 4 * offset, 4, value)
            elif kind == "table":
                function.bar_write(3, offset, size, value)
                function.bar_read(3, offset, size)
            elif kind == "vector":
                function.bar_write(3, 16 * offset, 4, 0xFEE0_0000)
                function.bar_write(3, 16 * offset + 8, 4, 0x40 + offset)
                function.bar_write(3, 16 * offset + 12, 4, value)
            else:
                function.bar_read(3, 0x2000 + offset, size)
            check_rules(guest)
    finally:
        guest.close()


def apply(guest: Guest, ops: list[tuple[str, int, int, int]]) -> None:
    function = guest.function
    for kind, offset, size, value in ops:
        value &= (1 << (8 * size)) - 1
        if kind == "config":
            guest.write(offset, size, value)
        elif kind == "bar":
            guest.write(PCI_BASE_ADDRESS_0 + 4 * offset, 4, value)
        elif kind == "table":
            function.bar_write(3, offset, size, value)
        elif kind == "vector":
            function.bar_write(3, 16 * offset, 4, 0xFEE0_0000)
            function.bar_write(3, 16 * offset + 8, 4, 0x40 + offset)
            function.bar_write(3, 16 * offset + 12, 4, value)


def seen_by_the_guest(guest: Guest) -> tuple[object, ...]:
    """Everything the guest can observe of the function, and where its BARs and vectors go."""
    config = [guest.read(offset, 4) for offset in range(0, 0x100, 4)]
    config[(EXP + 8) // 4] &= ~0x8000  # FLR: a real device reads it 0, the fake keeps it
    table = [guest.function.bar_read(3, offset, 4) for offset in range(0, 5 * 16, 4)]
    slots = sorted((r.gpa, r.size) for r in guest.space.regions(RegionKind.DEVICE))
    live = sorted(
        i for i, fd in enumerate(guest.function.msix.eventfds) if fd.fd in guest.vm.irqfds
    )
    return config, table, slots, live, guest.function.interrupts.mode, guest.device.mode


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=40))
@example(  # FLR asked for: a restore sets the guest's device control bits but resets nothing
    [("config", EXP + 8, 2, 0x8000 | 0x2810), ("config", MSIX + 2, 2, 0x8000), ("vector", 2, 4, 0)]
)
def test_a_saved_function_restored_onto_a_reset_device_looks_the_same_to_the_guest(ops) -> None:
    """Random guest traffic, then save; a fresh function over a device as reset takes the
    state (as plain data, as a snapshot carries it): the guest sees the same config space,
    MSI-X table, BAR slots, live vectors and interrupt index, the device got the guest's bits
    back, and no FLR was replayed."""
    first, second = Guest(), Guest()
    try:
        apply(first, ops)
        saved = to_plain(first.function.save())
        second.function.restore(from_plain(VfioPciFunctionState, saved))
        assert seen_by_the_guest(second) == seen_by_the_guest(first)
        for offset in DEVICE_WRITABLE:
            mask = DEVICE_WRITABLE[offset] & (0x7F if offset == EXP + 9 else 0xFF)
            assert second.device.config[offset] & mask == first.device.config[offset] & mask
        assert not [w for o, _, w in second.device.config_writes if o == EXP + 8 and w[1] & 0x80], (
            "an FLR was replayed"
        )
        check_rules(second)
    finally:
        first.close()
        second.close()


def test_a_saved_state_of_another_device_is_refused() -> None:
    first, second = Guest(), Guest(FakeDevice(msix_vectors=3))
    try:
        saved = first.function.save()
        with pytest.raises(StateError, match=r"another device.s"):
            second.function.check(saved)
    finally:
        first.close()
        second.close()


def test_memory_decode_off_and_d3_unmap_the_slots_before_the_device_hears_of_it(
    guest: Guest,
) -> None:
    """vfio-pci zaps its BAR mmaps when decode goes off or the device leaves D0: by the time
    such a write reaches the device, no KVM slot may point at them any more."""
    slots_seen: list[int] = []
    guest.device.on_config_write = lambda offset, data: slots_seen.append(
        len(guest.space.regions(RegionKind.DEVICE))
    )
    assert len(guest.space.regions(RegionKind.DEVICE)) == 3
    command = guest.read(PCI_COMMAND, 2)
    guest.write(PCI_COMMAND, 2, command & ~0x2)
    assert slots_seen == [0] and guest.space.regions(RegionKind.DEVICE) == []
    guest.write(PCI_COMMAND, 2, command)
    assert len(guest.space.regions(RegionKind.DEVICE)) == 3
    slots_seen.clear()
    guest.write(PM + 4, 2, 3)  # D3hot
    assert slots_seen == [0] and guest.space.regions(RegionKind.DEVICE) == []
    guest.write(PM + 4, 2, 0)  # D0 again: mapped again
    assert len(guest.space.regions(RegionKind.DEVICE)) == 3


def test_msix_offers_what_vfio_offers_and_msi_takes_what_the_host_can_give() -> None:
    guest = Guest(FakeDevice(msix_vectors=3, msi_vectors=4))
    try:
        assert guest.read(MSIX + 2, 2) & 0x7FF == 2  # 3 vectors, not the device's 5
        guest.write(MSIX + 2, 2, 0x8000)
        assert guest.device.mode == "msix" and guest.device.irq_sets[-1] == ("trigger", 2, 3)
        guest.write(MSIX + 2, 2, 0)
    finally:
        guest.close()
    device = FakeDevice(msi_vectors=4)
    device.config[MSI + 2] = 0x80 | 2 << 1  # 64-bit, 4 vectors offered
    device.msi_available = 2  # but the host can allocate only 2
    guest = Guest(device)
    try:
        guest.write(MSI + 4, 4, 0xFEE0_0000)
        guest.write(MSI + 2, 2, 1 | 2 << 4)  # MSI on, 4 vectors enabled
        assert guest.device.mode == "msi" and guest.device.irq_sets[-1] == ("trigger", 1, 2)
        assert guest.function.interrupts.mode is IrqMode.MSI
    finally:
        guest.close()
    assert guest.device.resets == 1  # reset when the function goes (it has a reset)


def test_intx_is_unmasked_from_python_when_the_device_refuses_an_unmask_eventfd(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = FakeDevice()
    device.refuse_unmask_eventfd = True
    with caplog.at_level(logging.WARNING):
        guest = Guest(device)
    try:
        assert "pyvmm unmasks it from Python at each EOI instead" in caplog.text
        assert device.mode == "intx"
        ((_, (_, resample)),) = guest.vm.irqfds.items()
        os_eventfd_write(resample, 1)  # what KVM does at the guest's EOI
        deadline = time.monotonic() + 5
        while device.unmasks == 0:
            assert time.monotonic() < deadline, "INTx was never unmasked"
            time.sleep(0.01)
        guest.write(MSI + 2, 2, 1)  # MSI on: INTx's irqfd goes, and KVM drops the line
        assert guest.vm.irqfds.keys() == {guest.function.msi.eventfds[0].fd}
    finally:
        guest.close()


def os_eventfd_write(fd: int, value: int) -> None:
    import os

    os.eventfd_write(fd, value)


def test_a_capability_the_config_region_cannot_hold_is_hidden() -> None:
    """mtty's config region is 255 bytes: a capability running past it is hidden, not a
    crash."""
    device = FakeDevice()
    device.config[EXP + 1] = 0xF4  # PCIe -> MSI-X at 0xF4, 12 bytes: past 255
    device.config[0xF4 : 0xF4 + 12] = bytes((0x11, 0)) + struct.pack("<HII", 4, 3, 3 | 0x2000)
    original = device.region

    def short_config(index: int) -> Region:
        region = original(index)
        if index == uapi.VfioPciRegion.CONFIG:
            return Region(index, region.flags, 255, region.offset, ())
        return region

    device.region = short_config  # type: ignore[method-assign]
    guest = Guest(device)
    try:
        assert guest.caps() == [(0x01, PM), (0x05, MSI), (0x10, EXP)]
        assert guest.function.msix is None
        assert guest.read(0xFC, 4) == 0  # emulated zeros: hidden
    finally:
        guest.close()
