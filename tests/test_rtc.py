"""The MC146818 CMOS RTC: time in BCD and binary, 12- and 24-hour modes, setting the clock,
CMOS RAM, snapshot state, and a hostile guest's writes (no KVM needed)."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.devices import rtc
from pyvmm.machine.state import StateError

# Saturday 2026-11-21 13:45:07 UTC
NOW = calendar.timegm((2026, 11, 21, 13, 45, 7))


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def read(dev: rtc.CmosRtc, index: int) -> int:
    dev.write(0, 1, index)
    return dev.read(1, 1)


def write(dev: rtc.CmosRtc, index: int, value: int) -> None:
    dev.write(0, 1, index)
    dev.write(1, 1, value)


def time_registers(dev: rtc.CmosRtc) -> list[int]:
    return [read(dev, i) for i in rtc.TIME_REGISTERS]


def test_reads_the_host_clock_in_bcd_24_hour_by_default() -> None:
    dev = rtc.CmosRtc(Clock())
    # sec, min, hour, weekday (Sunday = 1, so Saturday = 7), day, month, year, century
    assert time_registers(dev) == [0x07, 0x45, 0x13, 0x07, 0x21, 0x11, 0x26, 0x20]
    assert read(dev, rtc.REG_A) & rtc.REG_A_UIP == 0
    assert read(dev, rtc.REG_D) == rtc.REG_D_VRT
    assert dev.read(0, 1) == 0xFF  # the index port is write-only


def test_binary_and_12_hour_modes() -> None:
    dev = rtc.CmosRtc(Clock())
    write(dev, rtc.REG_B, rtc.REG_B_BINARY)  # binary, 12-hour
    assert time_registers(dev) == [7, 45, 1 | rtc.HOUR_PM, 7, 21, 11, 26, 20]
    write(dev, rtc.REG_B, rtc.REG_B_BINARY | rtc.REG_B_24H)
    assert read(dev, rtc.HOURS) == 13


def test_midnight_and_noon_in_12_hour_mode() -> None:
    clock = Clock(calendar.timegm((2026, 1, 1, 0, 30, 0)))
    dev = rtc.CmosRtc(clock)
    write(dev, rtc.REG_B, 0)  # BCD, 12-hour
    assert read(dev, rtc.HOURS) == 0x12  # 12 AM
    clock.now += 12 * 3600
    assert read(dev, rtc.HOURS) == 0x12 | rtc.HOUR_PM


def test_the_clock_runs_with_the_host() -> None:
    clock = Clock()
    dev = rtc.CmosRtc(clock)
    clock.now += 60 * 60 * 24 + 3
    assert time_registers(dev)[:5] == [0x10, 0x45, 0x13, 0x01, 0x22]  # Sunday the 22nd


def test_setting_the_time_with_the_set_bit_freezes_then_moves_the_clock() -> None:
    clock = Clock()
    dev = rtc.CmosRtc(clock)
    write(dev, rtc.REG_B, rtc.REG_B_SET | rtc.REG_B_24H)
    new_time = [0x00, 0x30, 0x08, 0x02, 0x01, 0x03, 0x99, 0x19]  # 1999-03-01 08:30:00
    for index, value in zip(rtc.TIME_REGISTERS, new_time, strict=True):
        write(dev, index, value)
    clock.now += 5  # frozen while SET is on
    assert read(dev, rtc.SECONDS) == 0x00
    write(dev, rtc.REG_B, rtc.REG_B_24H)
    clock.now += 2
    assert time_registers(dev)[:3] == [0x02, 0x30, 0x08]
    assert [read(dev, i) for i in (rtc.DAY_OF_MONTH, rtc.MONTH, rtc.YEAR, rtc.CENTURY)] == [
        0x01,
        0x03,
        0x99,
        0x19,
    ]


def test_writing_one_field_of_a_running_clock() -> None:
    dev = rtc.CmosRtc(Clock())
    write(dev, rtc.MINUTES, 0x05)
    assert time_registers(dev)[:3] == [0x07, 0x05, 0x13]


@pytest.mark.parametrize(
    ("mode", "index", "value"),
    [
        (rtc.REG_B_24H, rtc.MONTH, 0x13),  # month 13
        (rtc.REG_B_24H, rtc.HOURS, 0xAA),  # not BCD
        (rtc.REG_B_24H, rtc.HOURS, 0x24),
        (rtc.REG_B_24H, rtc.DAY_OF_MONTH, 0x31),  # 31 November
        (rtc.REG_B_24H, rtc.DAY_OF_MONTH, 0x00),
        (rtc.REG_B_24H, rtc.MINUTES, 0x60),
        (rtc.REG_B_24H, rtc.SECONDS, 0x99),
        (rtc.REG_B_24H | rtc.REG_B_BINARY, rtc.HOURS, 0x85),  # a PM bit in 24-hour mode
        (0, rtc.HOURS, 0x00),  # 12-hour mode has no hour 0
        (0, rtc.HOURS, 0x13 | rtc.HOUR_PM),
    ],
)
def test_a_time_that_does_not_exist_leaves_the_clock_alone(mode: int, index: int, value: int):
    dev = rtc.CmosRtc(Clock())
    write(dev, rtc.REG_B, mode)
    before = time_registers(dev)
    write(dev, index, value)
    assert time_registers(dev) == before


def test_the_first_tick_after_setting_comes_half_a_second_later() -> None:
    """As on the real part, and as Linux assumes: it writes second N half a second early."""
    clock = Clock(NOW + 0.25)
    dev = rtc.CmosRtc(clock)
    write(dev, rtc.REG_B, rtc.REG_B_SET | rtc.REG_B_24H)
    write(dev, rtc.SECONDS, 0x30)
    write(dev, rtc.REG_B, rtc.REG_B_24H)
    clock.now += 0.49
    assert read(dev, rtc.SECONDS) == 0x30
    clock.now += 0.02
    assert read(dev, rtc.SECONDS) == 0x31


def test_a_word_access_at_0x70_covers_index_and_data() -> None:
    dev = rtc.CmosRtc(Clock())
    dev.write(0, 2, 0x5A << 8 | 0x40)  # outw 0x70: index 0x40, data 0x5A
    assert read(dev, 0x40) == 0x5A
    dev.write(0, 1, rtc.MINUTES)
    assert dev.read(0, 2) == 0x45 << 8 | 0xFF  # inw 0x70: nothing, then the minutes
    assert dev.read(1, 2) == 0xFF << 8 | 0x45  # past 0x71 nothing answers


def test_cmos_ram_keeps_bytes_and_status_registers_are_read_only() -> None:
    dev = rtc.CmosRtc(Clock())
    write(dev, 0x40, 0x5A)
    write(dev, 0x7F | rtc.NMI_DISABLE, 0xA5)  # bit 7 of the index masks NMIs, not an address
    assert read(dev, 0x40) == 0x5A
    assert read(dev, 0x7F) == 0xA5
    write(dev, rtc.REG_C, 0xFF)
    write(dev, rtc.REG_D, 0x00)
    assert read(dev, rtc.REG_C) == 0
    assert read(dev, rtc.REG_D) == rtc.REG_D_VRT
    write(dev, rtc.REG_A, 0xFF)
    assert read(dev, rtc.REG_A) == 0x7F  # UIP is never set


def test_state_round_trip_keeps_ram_mode_and_offset() -> None:
    clock = Clock()
    a = rtc.CmosRtc(clock)
    write(a, rtc.REG_B, rtc.REG_B_BINARY | rtc.REG_B_24H)
    write(a, rtc.YEAR, 30)  # five years ahead
    write(a, 0x50, 0x77)
    state = a.save()
    b = rtc.CmosRtc(clock)
    b.restore(state)
    assert time_registers(b) == time_registers(a)
    assert read(b, rtc.YEAR) == 30
    assert read(b, 0x50) == 0x77
    assert b.save() == state


def test_state_mid_set_keeps_the_half_set_time() -> None:
    clock = Clock()
    a = rtc.CmosRtc(clock)
    write(a, rtc.REG_B, rtc.REG_B_SET | rtc.REG_B_24H)
    write(a, rtc.HOURS, 0x02)
    b = rtc.CmosRtc(clock)
    b.restore(a.save())
    clock.now += 10
    assert read(b, rtc.HOURS) == 0x02
    assert read(b, rtc.SECONDS) == 0x07  # still frozen


def test_restore_refuses_a_wrong_size() -> None:
    with pytest.raises(StateError, match="CMOS"):
        rtc.CmosRtc().restore(rtc.RtcState(cmos=bytes(10)))


ACCESS = st.tuples(st.integers(0, 1), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1))


@given(st.lists(ACCESS, max_size=200))
def test_hostile_writes_never_break_the_device(accesses: list[tuple[int, int, int]]) -> None:
    dev = rtc.CmosRtc(Clock())
    for port, size, value in accesses:
        dev.write(port, size, value)
        assert 0 <= dev.read(port, size) < 1 << (8 * size)
    for index in range(rtc.CMOS_SIZE):
        assert 0 <= read(dev, index) <= 0xFF
