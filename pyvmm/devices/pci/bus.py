"""PCI bus 0: its slots, the configuration address latch (CF8), and BAR assignment.

At plug time the bus hands each BAR an address from the machine's windows, as firmware would,
writes the GSI its INTx pin is wired to into PCI_INTERRUPT_LINE (pyvmm.machine.layout), tells
the function with `plugged()`, and turns decoding on; from then on the guest owns the BARs and
each function maps its own (see PciFunction.place_bar), on the port and MMIO buses and in the
address space the bus was given.
The bus is a component: its state is the CF8 latch (a guest may be between its address and data
accesses) and the functions it holds, which a restore checks rather than trusts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvmm.devices.pci.device import (
    PCI_COMMAND,
    PCI_COMMAND_IO,
    PCI_COMMAND_MEMORY,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    Bar,
    BarKind,
    PciFunction,
    bdf,
)
from pyvmm.machine import layout
from pyvmm.machine.address_space import AddressSpace
from pyvmm.machine.bus import Bus
from pyvmm.machine.state import StateError

MAX_DEVICES = 32
CONFIG_ADDRESS_MASK = 0x80FFFFFC  # enable, bus, device, function, dword register


@dataclass
class _Allocator:
    """Hands out naturally aligned addresses upwards from `base` (what firmware does)."""

    name: str
    base: int
    end: int

    def _next(self, size: int) -> int:
        return (self.base + size - 1) & ~(size - 1)

    def fits(self, size: int) -> bool:
        return self._next(size) + size <= self.end

    def allocate(self, size: int) -> int:
        address = self._next(size)
        if address + size > self.end:
            raise ValueError(f"PCI {self.name} window exhausted allocating {size:#x} bytes")
        self.base = address + size
        return address


@dataclass
class PciBusState:
    VERSION: ClassVar[int] = 1

    config_address: int
    functions: dict[int, str]  # devfn -> function model (PciFunction.model)


class PciBus:
    state_type: ClassVar[type] = PciBusState

    def __init__(
        self,
        pio: Bus,
        mmio: Bus,
        address_space: AddressSpace,
        mmio_window: tuple[int, int],
        io_window: tuple[int, int],
        *,
        mmio64_window: tuple[int, int] = (0, 0),
        on_plug: Callable[[PciFunction], None] | None = None,
    ) -> None:
        """`mmio_window` (below 4 GiB), `mmio64_window` (above it; (0, 0): none) and `io_window`
        are [start, end) ranges."""
        self.pio = pio
        self.mmio = mmio
        self.address_space = address_space
        self._mmio_window = _Allocator("32-bit memory", *mmio_window)
        self._mmio64_window = _Allocator("64-bit memory", *mmio64_window)
        self._large_bar = (mmio_window[1] - mmio_window[0]) // 4
        # Where device memory (a BAR in a KVM slot) may be: never elsewhere, whatever a guest
        # writes into a BAR (a trapped area anywhere is harmless; a slot is guest memory). The
        # DSDT's _CRS declares the same windows, so Linux keeps the BARs where they are.
        self.memory_windows = (mmio_window, mmio64_window)
        self._io_window = _Allocator("I/O", *io_window)
        self._lock = threading.RLock()
        self.functions: dict[int, PciFunction] = {}
        self._config_address = 0
        self._on_plug = on_plug

    def plug(self, function: PciFunction, slot: int | None = None) -> int:
        """Add a single-function device at `slot` (or the first free one); assigns its BARs
        and enables decoding, as firmware would. Returns the device number."""
        with self._lock:
            if slot is None:
                slot = next((s for s in range(MAX_DEVICES) if s << 3 not in self.functions), None)
                if slot is None:
                    raise ValueError("PCI bus 0 is full")
            if not 0 <= slot < MAX_DEVICES:
                raise ValueError(f"PCI slot {slot} does not exist (0 to {MAX_DEVICES - 1})")
            devfn = slot << 3
            if devfn in self.functions:
                raise ValueError(f"PCI slot {slot} is taken by {self.functions[devfn].name}")
            windows = (self._mmio_window, self._mmio64_window, self._io_window)
            bases = [window.base for window in windows]
            try:
                addresses = {}
                for bar in sorted(function.bars.values(), key=lambda b: -b.size):
                    addresses[bar.index] = self._allocate(bar)
                function.bus = self
                function.devfn = devfn
                self.functions[devfn] = function
                pin = function.config[PCI_INTERRUPT_PIN]
                if 1 <= pin <= 4:
                    function.config[PCI_INTERRUPT_LINE] = layout.pci_intx_gsi(slot, pin)
                function.plugged()  # what fails here unplugs it (its owner closes it)
                if self._on_plug is not None:
                    self._on_plug(function)
            except BaseException:  # nothing plugged, nothing allocated
                self.functions.pop(devfn, None)
                function.bus = None
                for window, base in zip(windows, bases, strict=True):
                    window.base = base
                raise
            command = 0
            for index, address in addresses.items():
                function.set_bar_address(index, address)
                kind = function.bars[index].kind
                command |= PCI_COMMAND_IO if kind is BarKind.IO else PCI_COMMAND_MEMORY
            if command:
                function.config_write(PCI_COMMAND, 2, function.command | command)
            return slot

    def _allocate(self, bar: Bar) -> int:
        """A BAR's first address, as firmware would give it: I/O BARs in the I/O window, memory
        BARs below 4 GiB; a 64-bit BAR above 4 GiB when it is large (a quarter of the 32-bit
        window or more, so it cannot starve the devices after it) or no longer fits below, and
        the window above has room (a CPU with few address bits may leave none)."""
        if bar.kind is BarKind.IO:
            return self._io_window.allocate(bar.size)
        goes_high = bar.size >= self._large_bar or not self._mmio_window.fits(bar.size)
        if bar.kind is BarKind.MEM64 and goes_high and self._mmio64_window.fits(bar.size):
            return self._mmio64_window.allocate(bar.size)
        return self._mmio_window.allocate(bar.size)

    # configuration mechanism #1's address latch

    @property
    def config_address(self) -> int:
        return self._config_address

    @config_address.setter
    def config_address(self, value: int) -> None:
        self._config_address = value & CONFIG_ADDRESS_MASK

    # config space accesses, from CF8/CFC and ECAM

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

    # state

    def save(self) -> PciBusState:
        with self._lock:
            models = {devfn: function.model for devfn, function in self.functions.items()}
            return PciBusState(self._config_address, models)

    def check(self, state: PciBusState) -> None:
        """The saved bus must hold the same functions in the same slots."""
        have = {devfn: function.model for devfn, function in self.functions.items()}
        if state.functions != have:
            saved = ", ".join(f"{bdf(d)} {n}" for d, n in sorted(state.functions.items()))
            raise StateError(f"PCI bus 0: saved with {saved or 'no functions'}, not these")

    def restore(self, state: PciBusState) -> None:
        self.check(state)
        self.config_address = state.config_address

    def close(self) -> None:
        """Unmap every function's BARs and close the functions (before RAM and the VM go)."""
        with self._lock:
            for function in reversed(list(self.functions.values())):
                function.close()
