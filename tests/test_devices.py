"""Unit tests of the emulated devices and the address-space registry (no KVM needed)."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.devices import serial as uart
from pyvmm.devices.pci.bus import PciBus
from pyvmm.devices.pci.device import PCI_BASE_ADDRESS_0, PCI_COMMAND
from pyvmm.devices.pci.host import ConfigPorts, Ecam, HostBridge
from pyvmm.devices.pci.testdev import PciTestDevice
from pyvmm.machine.bus import Bus, BusConflict


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_bus_finds_ranges_and_refuses_overlaps() -> None:
    bus = Bus("test")
    a, b = Recorder(), Recorder()
    bus.register(0x100, 0x10, a, "a")
    bus.register(0x110, 0x10, b, "b")
    assert bus.find(0x100).device is a
    assert bus.find(0x10F).device is a
    assert bus.find(0x110).device is b
    assert bus.find(0x120) is None
    assert bus.find(0xFF) is None
    with pytest.raises(BusConflict, match="overlaps"):
        bus.register(0x108, 0x10, Recorder(), "c")
    with pytest.raises(BusConflict):
        bus.register(0xF8, 0x10, Recorder(), "d")
    bus.unregister(0x100)
    assert bus.find(0x100) is None  # the lookup cache was dropped
    bus.register(0x100, 0x10, b, "b2")
    assert bus.find(0x105).device is b


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(1, 0x100)), max_size=30))
def test_bus_never_holds_overlapping_ranges(requests: list[tuple[int, int]]) -> None:
    bus = Bus("prop")
    for base, length in requests:
        with contextlib.suppress(BusConflict):
            bus.register(base, length, Recorder())
    ranges = bus.ranges()
    for first, second in itertools.pairwise(ranges):
        assert first.end <= second.base


class Uart:
    def __init__(self) -> None:
        self.out = bytearray()
        self.levels: list[int] = []
        self.dev = uart.Serial8250(self.out.extend, self.levels.append)

    def w(self, reg: int, value: int) -> None:
        self.dev.write(reg, 1, value)

    def r(self, reg: int) -> int:
        return self.dev.read(reg, 1)


def test_uart_transmits_and_reports_thr_empty() -> None:
    u = Uart()
    assert u.r(uart.LSR) & uart.LSR_THRE
    for byte in b"hi\n":
        u.w(uart.RBR_THR_DLL, byte)
    assert bytes(u.out) == b"hi\n"


def test_uart_divisor_latch_does_not_transmit() -> None:
    u = Uart()
    u.w(uart.LCR, uart.LCR_DLAB)
    u.w(uart.RBR_THR_DLL, 0x01)
    u.w(uart.IER_DLM, 0x00)
    assert u.r(uart.RBR_THR_DLL) == 0x01
    u.w(uart.LCR, 0x03)
    assert bytes(u.out) == b""


def test_uart_receive_raises_and_clears_interrupt() -> None:
    u = Uart()
    u.w(uart.MCR, uart.MCR_OUT2)
    u.w(uart.IER_DLM, uart.IER_RDI)
    assert u.dev.receive(b"ab") == 2
    assert u.levels[-1] == 1
    assert u.r(uart.IIR_FCR) & 0x0F == uart.IIR_RDI
    assert u.r(uart.LSR) & uart.LSR_DR
    assert u.r(uart.RBR_THR_DLL) == ord("a")
    assert u.r(uart.RBR_THR_DLL) == ord("b")
    assert u.levels[-1] == 0
    assert not u.r(uart.LSR) & uart.LSR_DR


def test_uart_thre_interrupt_is_acknowledged_by_reading_iir() -> None:
    u = Uart()
    u.w(uart.MCR, uart.MCR_OUT2)
    u.w(uart.IER_DLM, uart.IER_THRI)
    assert u.levels[-1] == 1
    assert u.r(uart.IIR_FCR) & 0x0F == uart.IIR_THRI
    assert u.levels[-1] == 0
    assert u.r(uart.IIR_FCR) & 0x0F == uart.IIR_NO_INT


def test_uart_loopback_as_linux_probes_it() -> None:
    u = Uart()
    u.w(uart.MCR, uart.MCR_LOOP | 0x0A)  # loop + RTS + OUT2
    assert u.r(uart.MSR) & 0xF0 == uart.MSR_CTS | uart.MSR_DCD
    u.w(uart.RBR_THR_DLL, 0x5A)
    assert bytes(u.out) == b""
    assert u.r(uart.RBR_THR_DLL) == 0x5A


def test_uart_state_round_trip() -> None:
    u = Uart()
    u.w(uart.IER_DLM, uart.IER_RDI)
    u.w(uart.SCR, 0x42)
    u.dev.receive(b"xyz")
    state = u.dev.state()
    v = Uart()
    v.dev.restore(state)
    assert v.r(uart.SCR) == 0x42
    assert bytes(v.r(uart.RBR_THR_DLL) for _ in range(3)) == b"xyz"


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 255), st.booleans()), max_size=200))
def test_uart_survives_any_register_traffic(ops: list[tuple[int, int, bool]]) -> None:
    u = Uart()
    for reg, value, is_write in ops:
        if is_write:
            u.w(reg, value)
        else:
            assert 0 <= u.r(reg) <= 0xFF
    assert len(u.dev.state().rx) <= uart.RX_FIFO_SIZE


def make_pci() -> tuple[PciBus, Bus, Bus, ConfigPorts, PciTestDevice]:
    pio, mmio = Bus("pio"), Bus("mmio")
    bus = PciBus(pio, mmio, (0xC000_0000, 0xE000_0000), (0xC000, 0x10000))
    bus.plug(HostBridge(), slot=0)
    dev = PciTestDevice()
    bus.plug(dev, slot=3)
    return bus, pio, mmio, ConfigPorts(bus, lambda: None), dev


def cf8(ports: ConfigPorts, slot: int, reg: int) -> None:
    ports.write(0, 4, 0x8000_0000 | slot << 11 | reg)


def test_pci_bar_sizing_and_move_remaps_the_window() -> None:
    _, pio, mmio, ports, dev = make_pci()
    bar0 = dev.bar_address(0)
    assert mmio.find(bar0).device.function is dev
    cf8(ports, 3, PCI_BASE_ADDRESS_0)
    ports.write(4, 4, 0xFFFF_FFFF)
    assert ports.read(4, 4) == 0xFFFF_F000  # 4 KiB, 32-bit, not prefetchable
    ports.write(4, 4, 0xD000_0000)
    assert dev.bar_address(0) == 0xD000_0000
    assert mmio.find(bar0) is None
    window = mmio.find(0xD000_0010)
    window.device.write(0x10, 4, 0xCAFE)
    assert window.device.read(0x10, 4) == 0xCAFE
    # 64-bit BAR2: high dword sizes too
    cf8(ports, 3, PCI_BASE_ADDRESS_0 + 12)
    ports.write(4, 4, 0xFFFF_FFFF)
    assert ports.read(4, 4) == 0xFFFF_FFFF
    # I/O BAR1 keeps its type bit
    cf8(ports, 3, PCI_BASE_ADDRESS_0 + 4)
    ports.write(4, 4, 0xFFFF_FFFF)
    assert ports.read(4, 4) == 0xFFFF_FF01
    assert pio.find(dev.bar_address(1)) is not None


def test_pci_command_register_gates_decoding() -> None:
    _, pio, mmio, ports, dev = make_pci()
    bar0, bar1 = dev.bar_address(0), dev.bar_address(1)
    cf8(ports, 3, PCI_COMMAND)
    ports.write(4, 2, 0)
    assert mmio.find(bar0) is None and pio.find(bar1) is None
    ports.write(4, 2, 0x3)
    assert mmio.find(bar0) is not None and pio.find(bar1) is not None


def test_pci_config_reads_of_empty_slots_and_other_buses_are_all_ones() -> None:
    bus, _, _, ports, _ = make_pci()
    cf8(ports, 7, 0)
    assert ports.read(4, 4) == 0xFFFF_FFFF
    ports.write(0, 4, 0x8001_0000)  # bus 1
    assert ports.read(4, 2) == 0xFFFF
    ecam = Ecam(bus)
    assert ecam.read(3 << 15, 2) == 0x5056
    assert ecam.read(1 << 20, 4) == 0xFFFF_FFFF
    assert ecam.read(0xFFE, 4) == 0xFFFF_FFFF  # straddles the function's 4 KiB


def test_pci_state_round_trip_moves_bar_windows_and_keeps_the_cf8_latch() -> None:
    """A snapshot taken after the guest moved BAR0 and wrote a scratch register, restored into
    a fresh machine: the window is where the guest put it, with the data behind it."""
    _, _, mmio, ports, dev = make_pci()
    assigned = dev.bar_address(0)
    cf8(ports, 3, PCI_BASE_ADDRESS_0)
    ports.write(4, 4, 0xD000_0000)
    mmio.find(0xD000_0010).device.write(0x10, 4, 0xCAFE)
    cf8(ports, 3, PCI_COMMAND)  # the guest is between its CF8 and CFC accesses
    saved, latch = dev.state(), ports.state()

    _, _, new_mmio, new_ports, new_dev = make_pci()
    new_dev.restore(saved)
    new_ports.restore(latch)
    assert new_dev.bar_address(0) == 0xD000_0000
    assert new_mmio.find(assigned) is None
    assert new_mmio.find(0xD000_0010).device.read(0x10, 4) == 0xCAFE
    assert new_ports.read(4, 2) == dev.command  # CFC reads the latched register
    assert new_dev.state() == saved
    with pytest.raises(ValueError, match="not of a PCI test device"):
        new_dev.restore(HostBridge().state())


def test_pci_reset_control_register() -> None:
    pio, mmio = Bus("pio"), Bus("mmio")
    resets: list[bool] = []
    ports = ConfigPorts(PciBus(pio, mmio, (0, 0x1000), (0, 0x100)), lambda: resets.append(True))
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
def test_pci_config_space_survives_any_guest_writes(writes: list[tuple[int, int, int]]) -> None:
    bus, _, _, _, dev = make_pci()
    for offset, size, value in writes:
        bus.config_write(3 << 3, offset, size, value & ((1 << (8 * size)) - 1))
    assert bus.config_read(3 << 3, 0, 2) == 0x5056  # read-only IDs survive
    assert len(dev.config) == 4096
