"""The PCI host bridge: function 00:00.0, configuration mechanism #1 (ports 0xCF8/0xCFC) and
ECAM (memory-mapped config space, 1 MiB per bus, 4 KiB per function)."""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.devices.pci.bus import PciBus
from pyvmm.devices.pci.device import PciFunction
from pyvmm.machine import layout

# The same IDs cloud-hypervisor uses for its virtual root: no Linux quirks key on them.
HOST_BRIDGE_VENDOR = 0x8086
HOST_BRIDGE_DEVICE = 0x0D57
CLASS_HOST_BRIDGE = 0x060000

CONFIG_ENABLE = 1 << 31


class HostBridge(PciFunction):
    def __init__(self) -> None:
        super().__init__(
            HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, CLASS_HOST_BRIDGE, name="host-bridge"
        )


RESET_CONTROL_OFFSET = layout.RESET_PORT - layout.PCI_CONFIG_PORT
RESET_CONTROL_RESET = 0x04


class ConfigPorts:
    """CF8 (address, 32-bit) and CFC-CFF (data), registered at 0xCF8 for 8 ports.

    A byte write to 0xCF9, inside the address dword, is the chipset's reset control register
    (PIIX/ICH): bit 2 resets the machine.
    """

    def __init__(self, bus: PciBus, on_reset: Callable[[], None]) -> None:
        self._bus = bus
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            return self._bus.config_address if offset == 0 and size == 4 else (1 << (8 * size)) - 1
        target = self._target(offset - 4, size)
        if target is None:
            return (1 << (8 * size)) - 1
        return self._bus.config_read(*target, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                self._bus.config_address = value
            elif offset == RESET_CONTROL_OFFSET and size == 1 and value & RESET_CONTROL_RESET:
                self._on_reset()
            return
        target = self._target(offset - 4, size)
        if target is not None:
            self._bus.config_write(*target, size, value)

    def _target(self, data_offset: int, size: int) -> tuple[int, int] | None:
        address = self._bus.config_address
        if not address & CONFIG_ENABLE or (address >> 16) & 0xFF != 0:
            return None  # only bus 0 exists
        register = (address & 0xFC) + data_offset
        if data_offset + size > 4:
            return None
        return (address >> 8) & 0xFF, register


class Ecam:
    """Memory-mapped config space: offset = bus << 20 | devfn << 12 | register."""

    def __init__(self, bus: PciBus) -> None:
        self._bus = bus

    def read(self, offset: int, size: int) -> int:
        if offset >> 20 != 0 or (offset & 0xFFF) + size > 0x1000:
            return (1 << (8 * size)) - 1
        return self._bus.config_read((offset >> 12) & 0xFF, offset & 0xFFF, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >> 20 == 0 and (offset & 0xFFF) + size <= 0x1000:
            self._bus.config_write((offset >> 12) & 0xFF, offset & 0xFFF, size, value)
