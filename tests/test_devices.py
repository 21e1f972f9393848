"""Unit tests of the 8250 UART and the port/MMIO registry (no KVM needed); PCI is in
test_pci.py."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.devices import serial as uart
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
def test_bus_takes_a_range_exactly_when_it_overlaps_none_it_holds(
    requests: list[tuple[int, int]],
) -> None:
    bus = Bus("prop")
    held: list[tuple[int, int]] = []  # the model: (base, end) of what the bus took
    for base, length in requests:
        overlaps = any(base < end and held_base < base + length for held_base, end in held)
        if overlaps:
            with pytest.raises(BusConflict):
                bus.register(base, length, Recorder())
        else:
            bus.register(base, length, Recorder())
            held.append((base, base + length))
    assert [(r.base, r.end) for r in bus.ranges()] == sorted(held)
    for first, second in itertools.pairwise(bus.ranges()):
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
    state = u.dev.save()
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
    assert len(u.dev.save().rx) <= uart.RX_FIFO_SIZE
