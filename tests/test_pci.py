"""PCI bus 0 and its functions, without KVM: config space and its masks, capability lists
(standard and extended), BAR sizing and moves, BARs mapped by the function (trapped areas on
the bus, device memory as regions of the address space), state."""

from __future__ import annotations

import itertools
import struct

import pytest
from fakes import RecordingSlots
from hypothesis import given
from hypothesis import strategies as st
from pcibench import Pci

from pyvmm.devices.pci.bus import PciBus
from pyvmm.devices.pci.capability import (
    PCI_EXT_CAP_ID_VNDR,
    Capability,
    ExtendedCapability,
)
from pyvmm.devices.pci.device import (
    PCI_BASE_ADDRESS_0,
    PCI_COMMAND,
    Bar,
    BarArea,
    BarKind,
    PciFunction,
)
from pyvmm.devices.pci.host import ConfigPorts, Ecam, HostBridge
from pyvmm.devices.pci.testdev import (
    MAPPED_BAR,
    MAPPED_OFFSET,
    MAPPED_SIZE,
    VSEC_IDS,
)
from pyvmm.kvm.mmap import Mapping
from pyvmm.machine import layout
from pyvmm.machine.address_space import AddressSpace
from pyvmm.machine.bus import Bus
from pyvmm.machine.memory import MemoryRegion, RegionKind
from pyvmm.machine.state import StateError, from_plain, to_plain

PCI_STATUS = 0x06
MiB = 1 << 20


@pytest.fixture
def pci():
    machine = Pci()
    yield machine
    machine.close()


def test_bar_sizing_and_move_remaps_the_window(pci: Pci) -> None:
    dev = pci.dev
    bar0 = dev.bar_address(0)
    assert pci.mmio.find(bar0).device.function is dev
    pci.cf8(3, PCI_BASE_ADDRESS_0)
    pci.ports.write(4, 4, 0xFFFF_FFFF)
    assert pci.ports.read(4, 4) == 0xFFFF_F000  # 4 KiB, 32-bit, not prefetchable
    pci.ports.write(4, 4, 0xD000_0000)
    assert dev.bar_address(0) == 0xD000_0000
    assert pci.mmio.find(bar0) is None
    window = pci.mmio.find(0xD000_0010)
    window.device.write(0x10, 4, 0xCAFE)
    assert window.device.read(0x10, 4) == 0xCAFE
    # 64-bit BAR2: high dword sizes too
    pci.cf8(3, PCI_BASE_ADDRESS_0 + 12)
    pci.ports.write(4, 4, 0xFFFF_FFFF)
    assert pci.ports.read(4, 4) == 0xFFFF_FFFF
    # I/O BAR1 keeps its type bit
    pci.cf8(3, PCI_BASE_ADDRESS_0 + 4)
    pci.ports.write(4, 4, 0xFFFF_FFFF)
    assert pci.ports.read(4, 4) == 0xFFFF_FF01
    assert pci.pio.find(dev.bar_address(1)) is not None


def test_command_register_gates_decoding(pci: Pci) -> None:
    dev = pci.dev
    bar0, bar1, bar4 = dev.bar_address(0), dev.bar_address(1), dev.bar_address(MAPPED_BAR)
    pci.cf8(3, PCI_COMMAND)
    pci.ports.write(4, 2, 0)
    assert pci.mmio.find(bar0) is None and pci.pio.find(bar1) is None
    assert pci.device_regions() == []  # BAR4's device memory left the address space
    pci.ports.write(4, 2, 0x3)
    assert pci.mmio.find(bar0) is not None and pci.pio.find(bar1) is not None
    (region,) = pci.device_regions()
    assert region.gpa == bar4 + MAPPED_OFFSET


def test_a_bar_of_device_memory_with_a_trapped_page(pci: Pci) -> None:
    """BAR4: its first page is trapped (scratch registers on the MMIO bus), the rest is host
    memory in a KVM slot of its own, which moves with the BAR and keeps its slot."""
    dev = pci.dev
    base = dev.bar_address(MAPPED_BAR)
    window = pci.mmio.find(base)
    assert window.end == base + MAPPED_OFFSET and pci.mmio.find(base + MAPPED_OFFSET) is None
    (region,) = pci.device_regions()
    assert (region.gpa, region.size, region.host_addr) == (
        base + MAPPED_OFFSET,
        MAPPED_SIZE,
        dev.device_memory.addr,
    )
    slot = region.slot
    assert pci.slots.slots[slot] == (region.gpa, MAPPED_SIZE, dev.device_memory.addr, 0)
    pci.cf8(3, PCI_BASE_ADDRESS_0 + 4 * MAPPED_BAR)
    pci.ports.write(4, 4, 0xD000_0000)
    assert region.slot == slot and pci.slots.slots[slot][0] == 0xD000_0000 + MAPPED_OFFSET
    assert pci.mmio.find(base) is None and pci.mmio.find(0xD000_0000).device.offset == 0
    # A hostile guest puts BAR4 over BAR0: the trapped page cannot go there (kept unmapped,
    # with a warning) but nothing breaks, and moving it away maps all of it again.
    pci.ports.write(4, 4, dev.bar_address(0) & ~0xFFFF)
    pci.ports.write(4, 4, 0xD100_0000)
    assert pci.mmio.find(0xD100_0000) is not None
    assert pci.device_regions()[0].gpa == 0xD100_0000 + MAPPED_OFFSET


def test_device_memory_is_never_placed_over_ram_or_reserved_ranges(pci: Pci) -> None:
    pci.space.add(MemoryRegion(RegionKind.RESERVED, 0xFEC0_0000, 0x10_0000, name="apics"))
    pci.cf8(3, PCI_BASE_ADDRESS_0 + 4 * MAPPED_BAR)
    for hostile in (0xFEC0_0000, 0x0010_0000):  # inside the reserved range; over guest RAM
        pci.ports.write(4, 4, hostile)
        assert pci.device_regions() == []
        assert [r.name for r in pci.space.regions()] == ["ram", "apics"]
    pci.ports.write(4, 4, 0xD000_0000)  # somewhere free again: mapped again
    assert [r.gpa for r in pci.device_regions()] == [0xD000_0000 + MAPPED_OFFSET]


def test_a_bar_beyond_the_physical_address_space_maps_nothing_and_leaks_nothing() -> None:
    """A 64-bit BAR whose high dword the guest sets to all-ones: beyond MAXPHYADDR, which KVM
    would refuse; nothing is mapped there and moving it back maps it again, once."""

    class Mapped64(PciFunction):
        def __init__(self, memory: Mapping) -> None:
            super().__init__(0x1234, 0x1, 0, bars=(Bar(0, BarKind.MEM64, 0x2000),))
            self.memory = memory

        def bar_areas(self, index: int) -> list[BarArea]:
            return [BarArea(0, 0x1000), BarArea(0x1000, 0x1000, self.memory.addr)]

    pci = Pci()
    try:
        with Mapping(0x1000) as memory:
            function = Mapped64(memory)
            pci.bus.plug(function, slot=5)
            base = function.bar_address(0)
            for _ in range(3):
                function.config_write(PCI_BASE_ADDRESS_0 + 4, 4, 0xFFFF_FFFF)
                assert [r for r in pci.device_regions() if r.host_addr == memory.addr] == []
                function.config_write(PCI_BASE_ADDRESS_0 + 4, 4, 0)
                assert [r.gpa for r in pci.device_regions() if r.host_addr == memory.addr] == [
                    base + 0x1000
                ]
            windows = [r for r in pci.mmio.ranges() if r.device.function is function]
            assert [w.base for w in windows] == [base]  # no stale window left behind
            pci.bus.close()
    finally:
        pci.space.memory.close()


def test_large_64_bit_bars_and_those_that_no_longer_fit_go_above_4_gib() -> None:
    """What firmware does: memory BARs below 4 GiB, except 64-bit ones of a quarter of the
    32-bit window or more, and 64-bit ones once the window below is full; 32-bit BARs that do
    not fit are refused. Every BAR naturally aligned, in a window and apart from the others."""
    high = (0x10_0000_0000, 1 << 40)
    bus = PciBus(
        Bus("p"),
        Bus("m"),
        AddressSpace(RecordingSlots(), 8, phys_bits=40),
        (0xC000_0000, 0xC000_0000 + 64 * MiB),
        (0xC000, 0x10000),
        mmio64_window=high,
    )

    def function(*bars: tuple[BarKind, int]) -> PciFunction:
        made = PciFunction(
            0x1234, 1, 0, bars=tuple(Bar(2 * i, k, n) for i, (k, n) in enumerate(bars))
        )
        bus.plug(made)
        return made

    big = function((BarKind.MEM64, 1 << 30), (BarKind.MEM64, 1 * MiB), (BarKind.MEM32, 1 * MiB))
    assert big.bar_address(0) == high[0]  # 1 GiB: only above
    assert 0xC000_0000 <= big.bar_address(2) < 1 << 32  # small: below
    assert 0xC000_0000 <= big.bar_address(4) < 1 << 32
    quarter = function((BarKind.MEM64, 16 * MiB))
    assert quarter.bar_address(0) >= high[0]
    filler = function((BarKind.MEM32, 32 * MiB))
    assert filler.bar_address(0) < 1 << 32
    overflow = function((BarKind.MEM64, 8 * MiB))  # the window below is full now
    assert overflow.bar_address(0) >= high[0]
    with pytest.raises(ValueError, match="PCI 32-bit memory window exhausted"):
        function((BarKind.MEM32, 8 * MiB))
    placed = sorted(
        (f.bar_address(i), bar.size)
        for f in (big, quarter, filler, overflow)
        for i, bar in f.bars.items()
    )
    assert all(start % size == 0 for start, size in placed)
    for (start, size), (following, _) in itertools.pairwise(placed):
        assert start + size <= following
    assert all(
        any(lo <= start and start + size <= hi for lo, hi in bus.memory_windows)
        for start, size in placed
    )


def test_large_64_bit_bars_stay_below_4_gib_when_the_cpu_has_no_room_above() -> None:
    """36 address bits end at 64 GiB, where the 64-bit window would start: it is empty, and a
    large 64-bit BAR goes below 4 GiB as before rather than failing."""
    space = AddressSpace(RecordingSlots(), 8, phys_bits=36)
    window = (layout.pci_mmio64_base(64 * MiB), space.limit)
    bus = PciBus(
        Bus("p"), Bus("m"), space, (0xC000_0000, 0xE000_0000), (0xC000, 0x10000),
        mmio64_window=window,
    )  # fmt: skip
    function = PciFunction(0x1234, 1, 0, bars=(Bar(0, BarKind.MEM64, 256 * MiB),))
    bus.plug(function)
    assert function.bar_address(0) == 0xC000_0000


def test_the_64_bit_window_starts_above_ram_that_reaches_64_gib() -> None:
    assert layout.pci_mmio64_base(1 << 30) == layout.PCI_MMIO64_BASE
    # 3 GiB below the PCI hole, the rest from 4 GiB: 70 GiB of RAM ends at 71 GiB
    assert layout.pci_mmio64_base(70 << 30) == 71 << 30
    assert layout.pci_mmio64_base((70 << 30) + 4096) == 72 << 30  # 1 GiB aligned


def test_a_function_that_does_not_fit_takes_nothing_from_either_window() -> None:
    """Its large BAR found room above 4 GiB, its 32-bit one none below: nothing is plugged,
    and the next function gets the addresses the first would have had."""
    high = (0x10_0000_0000, 1 << 40)
    bus = PciBus(
        Bus("p"), Bus("m"), AddressSpace(RecordingSlots(), 8, phys_bits=40),
        (0xC000_0000, 0xC000_0000 + 64 * MiB), (0xC000, 0x10000), mmio64_window=high,
    )  # fmt: skip
    bars = (Bar(0, BarKind.MEM64, 1 << 30), Bar(2, BarKind.MEM32, 128 * MiB))
    with pytest.raises(ValueError, match="32-bit memory window exhausted"):
        bus.plug(PciFunction(0x1234, 1, 0, bars=bars))
    assert set(bus.functions) == set()
    fits = PciFunction(0x1234, 2, 0, bars=(bars[0], Bar(2, BarKind.MEM32, 1 * MiB)))
    bus.plug(fits)
    assert (fits.bar_address(0), fits.bar_address(2)) == (high[0], 0xC000_0000)


def test_closing_the_bus_unmaps_every_bar(pci: Pci) -> None:
    pci.bus.close()
    assert pci.device_regions() == [] and list(pci.slots.slots) == [0]  # RAM's only
    assert pci.mmio.ranges() == [] and pci.pio.ranges() == []


def test_config_reads_of_empty_slots_and_other_buses_are_all_ones(pci: Pci) -> None:
    pci.cf8(7, 0)
    assert pci.ports.read(4, 4) == 0xFFFF_FFFF
    pci.ports.write(0, 4, 0x8001_0000)  # bus 1
    assert pci.ports.read(4, 2) == 0xFFFF
    ecam = Ecam(pci.bus)
    assert ecam.read(3 << 15, 2) == 0x5056
    assert ecam.read(1 << 20, 4) == 0xFFFF_FFFF
    assert ecam.read(0xFFE, 4) == 0xFFFF_FFFF  # straddles the function's 4 KiB


def test_extended_capabilities_are_chained_from_0x100(pci: Pci) -> None:
    ecam = Ecam(pci.bus)
    found = []
    offset = 0x100
    while offset:
        header = ecam.read(3 << 15 | offset, 4)
        found.append((header & 0xFFFF, header >> 16 & 0xF, offset))
        vsec = ecam.read(3 << 15 | offset + 4, 4)
        assert vsec >> 20 == 16  # the VSEC length
        offset = header >> 20
    assert found == [(PCI_EXT_CAP_ID_VNDR, 1, 0x100), (PCI_EXT_CAP_ID_VNDR, 1, 0x110)]
    assert [ecam.read(3 << 15 | off + 12, 4) for *_, off in found] == list(VSEC_IDS)
    assert ecam.read(0 << 15 | 0x100, 4) == 0  # the host bridge has none: a zero header
    for offset in range(0x100, 0x120, 4):  # read-only to the guest
        before = ecam.read(3 << 15 | offset, 4)
        ecam.write(3 << 15 | offset, 4, 0xFFFF_FFFF)
        assert ecam.read(3 << 15 | offset, 4) == before


def test_capability_lists_refuse_the_other_kind_and_overflow() -> None:
    function = PciFunction(0x1234, 0x5678, 0)
    with pytest.raises(TypeError, match="other kind"):
        function.capabilities.add(ExtendedCapability(1, 1, bytes(4)))
    with pytest.raises(TypeError, match="other kind"):
        function.extended_capabilities.add(Capability(5, bytes(4)))
    with pytest.raises(ValueError, match="out of range"):
        ExtendedCapability(0x1_0000, 1, b"")
    function.add_capability(Capability(0x09, bytes(150)))
    with pytest.raises(ValueError, match="does not fit"):
        function.add_capability(Capability(0x09, bytes(100)))


def test_status_error_bits_are_write_one_to_clear() -> None:
    function = PciFunction(0x1234, 0x5678, 0)
    struct.pack_into("<H", function.config, PCI_STATUS, 0xF910)  # errors + capability list
    function.config_write(PCI_STATUS, 2, 0x0100)  # clears bit 8 only
    assert function.config_read(PCI_STATUS, 2) == 0xF810
    function.config_write(PCI_STATUS, 2, 0xFFFF)
    assert function.config_read(PCI_STATUS, 2) == 0x0010  # capability list is read-only


class PassThrough(PciFunction):
    """A function that emulates only its command register: the rest is a 'device'."""

    def __init__(self) -> None:
        super().__init__(0, 0, 0, bars=(Bar(0, BarKind.MEM32, 0x1000),))
        self.device = bytearray(range(256)) * 16
        self.forwarded: list[tuple[int, int, int, int]] = []
        self.emulated[:] = bytes(len(self.emulated))
        self.emulated[PCI_COMMAND : PCI_COMMAND + 2] = b"\xff\xff"
        self.wmask[0x40:0x44] = b"\xff\x0f\x00\x00"  # a device register the guest may write

    def device_config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.device[offset : offset + size], "little")

    def device_config_write(self, offset: int, size: int, value: int, mask: int) -> None:
        self.forwarded.append((offset, size, value, mask))


def test_bits_not_emulated_come_from_the_device_and_only_writable_ones_go_to_it() -> None:
    function = PassThrough()
    assert function.config_read(0, 4) == 0x0302_0100  # IDs from the device
    assert function.config_read(PCI_COMMAND, 2) == 0  # the emulated command register
    function.config_write(PCI_COMMAND, 2, 0x0002)
    assert function.config_read(PCI_COMMAND, 2) == 0x0002 and function.forwarded == []
    function.config_write(0x40, 4, 0xDEAD_BEEF)
    assert function.forwarded == [(0x40, 4, 0xDEAD_BEEF, 0x0FFF)]
    function.config_write(0x00, 4, 0xFFFF_FFFF)  # read-only device bits: nothing forwarded
    assert len(function.forwarded) == 1


def test_state_round_trip_moves_bars_and_keeps_the_cf8_latch(pci: Pci) -> None:
    """A state saved after the guest moved BARs and wrote registers and device memory,
    restored into a fresh bus: everything is where the guest put it."""
    dev = pci.dev
    assigned = dev.bar_address(0)
    pci.cf8(3, PCI_BASE_ADDRESS_0)
    pci.ports.write(4, 4, 0xD000_0000)
    pci.cf8(3, PCI_BASE_ADDRESS_0 + 4 * MAPPED_BAR)
    pci.ports.write(4, 4, 0xD100_0000)
    pci.mmio.find(0xD000_0010).device.write(0x10, 4, 0xCAFE)
    dev.device_memory.view[100:104] = b"ramd"
    pci.cf8(3, PCI_COMMAND)  # the guest is between its CF8 and CFC accesses
    saved_dev, saved_bus = dev.save(), pci.bus.save()

    other = Pci()
    try:
        restored = from_plain(type(saved_dev), to_plain(saved_dev))
        other.bus.check(saved_bus)
        other.dev.restore(restored)
        other.bus.restore(saved_bus)
        assert other.dev.bar_address(0) == 0xD000_0000
        assert other.mmio.find(assigned) is None
        assert other.mmio.find(0xD000_0010).device.read(0x10, 4) == 0xCAFE
        assert other.device_regions()[0].gpa == 0xD100_0000 + MAPPED_OFFSET
        assert bytes(other.dev.device_memory.view[100:104]) == b"ramd"
        assert other.ports.read(4, 2) == dev.command  # CFC reads the latched register
        assert other.dev.save() == saved_dev
        with pytest.raises(StateError, match="saved device memory has 3 bytes"):
            other.dev.check(type(saved_dev)(saved_dev.function, saved_dev.scratch, b"abc"))
    finally:
        other.close()


def test_a_bus_with_other_functions_refuses_the_state(pci: Pci) -> None:
    saved = pci.bus.save()
    bare = PciBus(Bus("p"), Bus("m"), AddressSpace(RecordingSlots(), 4), (0, 0x1000), (0, 0x100))
    bare.plug(HostBridge(), slot=0)
    with pytest.raises(StateError, match=r"saved with 00:00.0 host-bridge, 00:03.0 pci-testdev"):
        bare.check(saved)


def test_reset_control_register() -> None:
    resets: list[bool] = []
    bus = PciBus(Bus("p"), Bus("m"), AddressSpace(RecordingSlots(), 4), (0, 0x1000), (0, 0x100))
    ports = ConfigPorts(bus, lambda: resets.append(True))
    ports.write(1, 1, 0x02)
    assert resets == []
    ports.write(1, 1, 0x06)
    assert resets == [True]


@given(
    st.lists(
        st.tuples(st.integers(0, 0x1000), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)),
        max_size=100,
    )
)
def test_guest_writes_change_only_writable_bits_and_bars_follow_config(
    writes: list[tuple[int, int, int]],
) -> None:
    pci = Pci()
    try:
        dev = pci.dev
        before = bytes(dev.config)
        for offset, size, value in writes:
            pci.bus.config_write(3 << 3, offset, size, value & ((1 << (8 * size)) - 1))
        changeable = bytes(w | c for w, c in zip(dev.wmask, dev.w1cmask, strict=True))
        for pos, (old, new) in enumerate(zip(before, dev.config, strict=True)):
            assert (old ^ new) & ~changeable[pos] == 0, f"read-only bits changed at {pos:#x}"
        assert pci.bus.config_read(3 << 3, 0, 4) == 0x0001_5056
        # Every BAR the guest left decoded at an address of its own is mapped there (the
        # trapped part on its bus, BAR4's memory in the address space); no BAR is mapped
        # anywhere else.
        spans = {
            i: (dev.bar_address(i), dev.bar_address(i) + bar.size)
            for i, bar in dev.bars.items()
            if dev.bar_address(i) and dev.decodes(bar)
        }
        for index, bar in dev.bars.items():
            bus = pci.pio if bar.kind is BarKind.IO else pci.mmio
            mine = [r for r in bus.ranges() if r.device.function is dev and r.device.index == index]
            assert all(r.base == spans[index][0] for r in mine) if mine else True
            if index not in spans:
                assert mine == []
                continue
            lo, hi = spans[index]
            same_bus = [
                j for j in spans if (dev.bars[j].kind is BarKind.IO) == (bar.kind is BarKind.IO)
            ]
            alone = all(j == index or spans[j][1] <= lo or hi <= spans[j][0] for j in same_bus)
            below_ram = bar.kind is BarKind.IO or lo >= 16 * MiB
            if alone and below_ram and hi <= 1 << 48:
                assert mine, f"BAR{index} at {lo:#x} is not mapped"
        regions = pci.device_regions()
        if MAPPED_BAR in spans and regions:
            assert regions[0].gpa == spans[MAPPED_BAR][0] + MAPPED_OFFSET
        if MAPPED_BAR not in spans:
            assert regions == []
    finally:
        pci.close()
