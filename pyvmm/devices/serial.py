"""8250/16550A UART (COM1), enough for Linux's 8250 driver and the test guests' polling printf.

Output bytes go to a console (stdio, file, socket; see pyvmm.machine.console); input bytes arrive
through `receive()`. The interrupt line is level-triggered: it is held high while an enabled
condition (data ready, transmitter empty) is pending, via the machine's IRQ line callback.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvmm.machine.state import StateError

# Register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
LCR_DLAB = 0x80
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

RX_FIFO_SIZE = 64


@dataclass
class SerialState:
    """Everything a snapshot needs to bring the UART back as it was."""

    VERSION: ClassVar[int] = 1

    dll: int = 0x0C
    dlm: int = 0
    ier: int = 0
    fcr: int = 0
    lcr: int = 0x03
    mcr: int = MCR_OUT2
    lsr: int = LSR_THRE | LSR_TEMT
    msr: int = MSR_DCD | MSR_DSR | MSR_CTS
    scr: int = 0
    thri_pending: bool = False
    rx: bytes = b""


class Serial8250:
    """A 16550A-compatible UART registered on 8 consecutive I/O ports."""

    state_type: ClassVar[type] = SerialState

    def __init__(self, output: Callable[[bytes], None], irq: Callable[[int], None]) -> None:
        self._output = output
        self._irq = irq
        self._lock = threading.Lock()
        self._regs = SerialState()
        self._rx: collections.deque[int] = collections.deque()
        self._irq_level = 0

    # bus device

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            out = self._write(offset, value & 0xFF)
            self._update_irq()
        if out is not None:
            self._output(out)

    def receive(self, data: bytes) -> int:
        """Queue input bytes for the guest; returns how many fit in the receive FIFO."""
        with self._lock:
            room = RX_FIFO_SIZE - len(self._rx)
            self._rx.extend(data[:room])
            self._update_irq()
            return min(room, len(data))

    # registers

    def _read(self, offset: int) -> int:
        regs = self._regs
        if offset == RBR_THR_DLL:
            if regs.lcr & LCR_DLAB:
                return regs.dll
            return self._rx.popleft() if self._rx else 0
        if offset == IER_DLM:
            return regs.dlm if regs.lcr & LCR_DLAB else regs.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRI:
                regs.thri_pending = False  # reading IIR acknowledges THRE
            return iir | (IIR_FIFO_ENABLED if regs.fcr & FCR_ENABLE_FIFO else 0)
        if offset == LCR:
            return regs.lcr
        if offset == MCR:
            return regs.mcr
        if offset == LSR:
            return regs.lsr | (LSR_DR if self._rx else 0)
        if offset == MSR:
            if regs.mcr & MCR_LOOP:
                return (
                    (MSR_CTS if regs.mcr & MCR_RTS else 0)
                    | (MSR_DSR if regs.mcr & MCR_DTR else 0)
                    | (MSR_RI if regs.mcr & MCR_OUT1 else 0)
                    | (MSR_DCD if regs.mcr & MCR_OUT2 else 0)
                )
            return regs.msr
        return regs.scr

    def _write(self, offset: int, value: int) -> bytes | None:
        regs = self._regs
        if offset == RBR_THR_DLL:
            if regs.lcr & LCR_DLAB:
                regs.dll = value
                return None
            regs.thri_pending = True  # the byte leaves at once: THR is empty again
            if regs.mcr & MCR_LOOP:
                if len(self._rx) < RX_FIFO_SIZE:
                    self._rx.append(value)
                return None
            return bytes((value,))
        if offset == IER_DLM:
            if regs.lcr & LCR_DLAB:
                regs.dlm = value
            else:
                if value & IER_THRI and not regs.ier & IER_THRI:
                    regs.thri_pending = True
                regs.ier = value & 0x0F
        elif offset == IIR_FCR:
            regs.fcr = value & (FCR_ENABLE_FIFO | 0xC0)
            if value & FCR_CLEAR_RCVR:
                self._rx.clear()
        elif offset == LCR:
            regs.lcr = value
        elif offset == MCR:
            regs.mcr = value & 0x1F
        elif offset == SCR:
            regs.scr = value
        return None

    def _iir(self) -> int:
        regs = self._regs
        if regs.ier & IER_RDI and self._rx:
            return IIR_RDI
        if regs.ier & IER_THRI and regs.thri_pending:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = 0 if self._iir() == IIR_NO_INT or not self._regs.mcr & MCR_OUT2 else 1
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)

    # state

    def save(self) -> SerialState:
        with self._lock:
            self._regs.rx = bytes(self._rx)
            return SerialState(**vars(self._regs))

    def check(self, state: SerialState) -> None:
        if len(state.rx) > RX_FIFO_SIZE:
            raise StateError(f"COM1: saved receive FIFO holds {len(state.rx)} bytes")

    def restore(self, state: SerialState) -> None:
        self.check(state)
        with self._lock:
            self._regs = SerialState(**vars(state))
            self._rx = collections.deque(state.rx)
            self._irq_level = 0
            self._update_irq()
