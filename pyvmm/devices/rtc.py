"""MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data).

The guest's clock is the host's UTC clock plus an offset the guest sets by writing the time
registers, so it keeps running with the host's time (and `save()` carries the offset into a
snapshot). The device updates instantly, so the update-in-progress bit (register A, bit 7)
always reads 0. Without an RTC the ports read 0xFF, UIP looks stuck, and Linux waited a second
for it on every read of the time (`mc146818_avoid_UIP`): boots were ~20 s longer in the lab. No
interrupts are raised on IRQ 8 (no periodic, alarm or update-ended interrupt); the enable bits in
register B are kept, and register C reads 0.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from pyvmm.machine import layout
from pyvmm.machine.state import StateError

INDEX_PORT_OFFSET = 0
DATA_PORT_OFFSET = 1

SECONDS = 0x00
MINUTES = 0x02
HOURS = 0x04
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
CENTURY = layout.RTC_CENTURY  # (as in QEMU and most PCs)
TIME_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

REG_A_UIP = 0x80
REG_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
REG_B_SET = 0x80  # the guest is setting the time: the clock is frozen
REG_B_24H = 0x02
REG_B_BINARY = 0x04  # data mode: binary instead of BCD
REG_D_VRT = 0x80  # valid RAM and time: the battery is fine
HOUR_PM = 0x80  # in 12-hour mode
NMI_DISABLE = 0x80  # bit 7 of the index
CMOS_SIZE = 128


@dataclass
class RtcState:
    """Everything a snapshot needs: the registers and RAM, and the guest clock's offset from
    the host's UTC clock."""

    VERSION: ClassVar[int] = 1

    index: int = 0
    nmi_disabled: bool = False
    cmos: bytes = field(default_factory=lambda: bytes(CMOS_SIZE))
    offset: float = 0.0


def _check(value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValueError(f"{value} is not in {low}..{high}")
    return value


class CmosRtc:
    """The RTC and its 128 bytes of CMOS RAM, registered on 2 I/O ports."""

    state_type: ClassVar[type] = RtcState

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[REG_A] = REG_A_DEFAULT
        self._cmos[REG_B] = REG_B_24H
        self._cmos[REG_D] = REG_D_VRT
        self._index = 0
        self._nmi_disabled = False
        self._offset = 0.0
        self._frozen: list[int] | None = None  # the time fields while REG_B_SET is on

    # bus device

    def read(self, offset: int, size: int) -> int:
        """A wider access covers both ports a byte each (an inw at 0x70 reads 0x70 and 0x71)."""
        value = 0
        with self._lock:
            for i, port in enumerate(range(offset, offset + size)):
                byte = self._read(self._index) if port == DATA_PORT_OFFSET else 0xFF
                value |= byte << (8 * i)  # the index register is write-only; past 0x71: nothing
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            for i, port in enumerate(range(offset, offset + size)):
                byte = value >> (8 * i) & 0xFF
                if port == INDEX_PORT_OFFSET:
                    self._index = byte & 0x7F
                    self._nmi_disabled = bool(byte & NMI_DISABLE)
                elif port == DATA_PORT_OFFSET:
                    self._write(self._index, byte)

    # registers

    def _read(self, index: int) -> int:
        if index in TIME_REGISTERS:
            return self._time_fields()[TIME_REGISTERS.index(index)]
        if index == REG_A:
            return self._cmos[REG_A] & ~REG_A_UIP
        if index == REG_C:
            return 0  # no interrupt flags: no interrupts are raised
        return self._cmos[index]

    def _write(self, index: int, value: int) -> None:
        if index in TIME_REGISTERS:
            fields = self._time_fields()
            fields[TIME_REGISTERS.index(index)] = value
            if self._frozen is not None:
                self._frozen = fields
            else:
                self._set_time(fields)
        elif index == REG_A:
            self._cmos[REG_A] = value & ~REG_A_UIP
        elif index == REG_B:
            was_set = self._cmos[REG_B] & REG_B_SET
            if value & REG_B_SET and not was_set:
                self._frozen = self._time_fields()
            self._cmos[REG_B] = value
            if was_set and not value & REG_B_SET and self._frozen is not None:
                self._set_time(self._frozen)
                self._frozen = None
        elif index not in (REG_C, REG_D):
            self._cmos[index] = value

    # time

    def _time_fields(self) -> list[int]:
        """The time registers' values (TIME_REGISTERS order), in the guest's data mode."""
        if self._frozen is not None:
            return list(self._frozen)
        now = time.gmtime(self._clock() + self._offset)
        hours = now.tm_hour
        if not self._cmos[REG_B] & REG_B_24H:
            hours = self._encode(hours % 12 or 12) | (HOUR_PM if now.tm_hour >= 12 else 0)
        else:
            hours = self._encode(hours)
        return [
            self._encode(now.tm_sec),
            self._encode(now.tm_min),
            hours,
            self._encode((now.tm_wday + 1) % 7 + 1),  # 1 = Sunday
            self._encode(now.tm_mday),
            self._encode(now.tm_mon),
            self._encode(now.tm_year % 100),
            self._encode(now.tm_year // 100),
        ]

    def _set_time(self, fields: list[int]) -> None:
        """Move the guest's clock to what the registers say. A time that does not exist (month
        13, 25 o'clock, 31 April, a BCD digit over 9) leaves the clock where it was.

        The first tick comes half a second later, as on the real part after SET clears: Linux
        writes the time half a second before the second it names (`set_offset_nsec`)."""
        import calendar  # (here: the guest setting its clock is rare, the import not cheap)

        seconds, minutes, hours_reg, _, mday, month, year, century = fields
        try:
            if self._cmos[REG_B] & REG_B_24H:
                hours = self._decode(hours_reg)
                _check(hours, 0, 23)
            else:
                hours = self._decode(hours_reg & ~HOUR_PM)
                _check(hours, 1, 12)
                hours = hours % 12 + (12 if hours_reg & HOUR_PM else 0)
            full_year = self._decode(century) * 100 + self._decode(year)
            month = _check(self._decode(month), 1, 12)
            mday = _check(self._decode(mday), 1, calendar.monthrange(full_year, month)[1])
            minutes = _check(self._decode(minutes), 0, 59)
            seconds = _check(self._decode(seconds), 0, 59)
            wanted = calendar.timegm((full_year, month, mday, hours, minutes, seconds))
        except ValueError:
            return
        self._offset = wanted + 0.5 - self._clock()

    def _encode(self, value: int) -> int:
        if self._cmos[REG_B] & REG_B_BINARY:
            return value
        return (value // 10) << 4 | value % 10

    def _decode(self, value: int) -> int:
        if self._cmos[REG_B] & REG_B_BINARY:
            return value
        tens, ones = value >> 4, value & 0xF
        if tens > 9 or ones > 9:
            raise ValueError(f"not BCD: {value:#x}")
        return tens * 10 + ones

    # state

    def save(self) -> RtcState:
        with self._lock:
            cmos = bytearray(self._cmos)
            if self._frozen is not None:  # a snapshot mid-set keeps the half-set time
                for index, value in zip(TIME_REGISTERS, self._frozen, strict=True):
                    cmos[index] = value
            return RtcState(self._index, self._nmi_disabled, bytes(cmos), self._offset)

    def check(self, state: RtcState) -> None:
        if len(state.cmos) != CMOS_SIZE:
            raise StateError(f"RTC state has {len(state.cmos)} bytes of CMOS, not {CMOS_SIZE}")

    def restore(self, state: RtcState) -> None:
        self.check(state)
        with self._lock:
            self._index = state.index & 0x7F
            self._nmi_disabled = state.nmi_disabled
            self._cmos = bytearray(state.cmos)
            self._offset = state.offset
            self._frozen = (
                [self._cmos[i] for i in TIME_REGISTERS] if self._cmos[REG_B] & REG_B_SET else None
            )
