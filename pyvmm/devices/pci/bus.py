"""PCI bus 0: function slots, BAR assignment from the machine's windows, and keeping each BAR's
window registered on the port/MMIO bus at the address the guest programmed."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from pyvmm.devices.pci.device import (
    PCI_COMMAND,
    PCI_COMMAND_IO,
    PCI_COMMAND_MEMORY,
    Bar,
    BarKind,
    PciFunction,
)
from pyvmm.machine.bus import Bus

log = logging.getLogger(__name__)

MAX_DEVICES = 32


@dataclass
class _Window:
    """An address range handed out upwards, naturally aligned (what firmware does)."""

    base: int
    end: int

    def allocate(self, size: int) -> int:
        address = (self.base + size - 1) & ~(size - 1)
        if address + size > self.end:
            raise ValueError(f"PCI window exhausted allocating {size:#x} bytes")
        self.base = address + size
        return address


class _BarWindow:
    """Bus adapter: forwards accesses in a BAR's range to its function."""

    def __init__(self, function: PciFunction, index: int) -> None:
        self.function = function
        self.index = index

    def read(self, offset: int, size: int) -> int:
        return self.function.bar_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.function.bar_write(self.index, offset, size, value)


class PciBus:
    def __init__(
        self, pio: Bus, mmio: Bus, mmio_window: tuple[int, int], io_window: tuple[int, int]
    ) -> None:
        self._pio = pio
        self._mmio = mmio
        self._mmio_window = _Window(*mmio_window)
        self._io_window = _Window(*io_window)
        self._lock = threading.RLock()
        self.functions: dict[int, PciFunction] = {}
        self._mapped: dict[tuple[int, int], tuple[Bus, int]] = {}

    def plug(self, function: PciFunction, slot: int | None = None) -> int:
        """Add a single-function device at `slot` (or the first free one); assigns its BARs
        and enables decoding, as firmware would. Returns the device number."""
        with self._lock:
            if slot is None:
                slot = next((s for s in range(MAX_DEVICES) if s << 3 not in self.functions), None)
                if slot is None:
                    raise ValueError("PCI bus 0 is full")
            devfn = slot << 3
            if devfn in self.functions:
                raise ValueError(f"PCI slot {slot} is taken by {self.functions[devfn].name}")
            function.bus = self
            function.devfn = devfn
            self.functions[devfn] = function
            command = 0
            for bar in sorted(function.bars.values(), key=lambda b: -b.size):
                window = self._io_window if bar.kind is BarKind.IO else self._mmio_window
                function.set_bar_address(bar.index, window.allocate(bar.size))
                command |= PCI_COMMAND_IO if bar.kind is BarKind.IO else PCI_COMMAND_MEMORY
            if command:
                function.config_write(PCI_COMMAND, 2, function.command | command)
            return slot

    def config_read(self, devfn: int, offset: int, size: int) -> int:
        function = self.functions.get(devfn)
        if function is None:
            return (1 << (8 * size)) - 1
        with self._lock:
            return function.config_read(offset, size)

    def config_write(self, devfn: int, offset: int, size: int, value: int) -> None:
        function = self.functions.get(devfn)
        if function is not None:
            with self._lock:
                function.config_write(offset, size, value)

    def update_bar_mappings(self, function: PciFunction) -> None:
        """Re-register the function's BAR windows where the guest put them."""
        with self._lock:
            for bar in function.bars.values():
                self._remap(function, bar)

    def _remap(self, function: PciFunction, bar: Bar) -> None:
        key = (function.devfn, bar.index)
        current = self._mapped.pop(key, None)
        if current is not None:
            bus, base = current
            bus.unregister(base)
        address = function.bar_address(bar.index)
        if not function.decodes(bar) or address == 0:
            return
        bus = self._pio if bar.kind is BarKind.IO else self._mmio
        try:
            bus.register(address, bar.size, _BarWindow(function, bar.index), function.name)
        except ValueError as err:
            # The guest may program overlapping BARs; real hardware decodes garbage then.
            log.warning("%s BAR%d not mapped: %s", function.name, bar.index, err)
            return
        self._mapped[key] = (bus, address)
