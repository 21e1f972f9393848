"""Where a virtio-pci function's structures are (virtio 1.2 §4.1.4): in its BAR 0, a page
each, and the vendor capabilities in config space that point the driver at them, with the
PCI-config window into the BARs for drivers that cannot map them yet.
"""

from __future__ import annotations

import struct

from pyvmm.devices.pci.capability import PCI_CAP_ID_VNDR, Capability
from pyvmm.devices.pci.device import PciFunction
from pyvmm.devices.virtio.pci_common import COMMON_SIZE

# virtio_pci_cap.cfg_type
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# BAR 0 layout
BAR_INDEX = 0
BAR_SIZE = 0x8000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
ISR_SIZE = 4
DEVICE_OFFSET = 0x2000
DEVICE_MAX = 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_MULTIPLIER = 4
NOTIFY_WIDTH = 2  # the driver writes the 16-bit queue index
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x6000
MAX_QUEUES = (MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) // 16 - 1  # one vector each + config


def _virtio_cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> Capability:
    """A read-only struct virtio_pci_cap (plus `extra` trailing bytes) pointing into BAR 0."""
    cap_len = 16 + len(extra)
    body = struct.pack("<BBBBxxII", cap_len, cfg_type, BAR_INDEX, 0, offset, length) + extra
    return Capability(PCI_CAP_ID_VNDR, body)


class PciCfgCapability(Capability):
    """VIRTIO_PCI_CAP_PCI_CFG: a window into the BARs through config space (§4.1.4.9), for
    drivers that cannot map BARs yet. The driver sets bar/offset/length; reading or writing
    pci_cfg_data then accesses the BAR there."""

    BAR, OFFSET, LENGTH, DATA = 4, 8, 12, 16

    def __init__(self, function: PciFunction) -> None:
        body = struct.pack("<BBBBxxIII", 20, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, 0, 0)
        wmask = struct.pack("<BBBBxxIII", 0, 0, 0xFF, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
        super().__init__(PCI_CAP_ID_VNDR, body, wmask)
        self._function = function

    def _target(self) -> tuple[int, int, int] | None:
        bar, offset, length = (
            self.get(self.BAR, 1),
            self.get(self.OFFSET, 4),
            self.get(self.LENGTH, 4),
        )
        if length not in (1, 2, 4) or offset % length or offset + length > BAR_SIZE:
            return None
        return bar, offset, length

    def _touches_data(self, offset: int, size: int) -> bool:
        return offset + size > self.DATA

    def before_read(self, offset: int, size: int) -> None:
        target = self._target()
        if target is not None and self._touches_data(offset, size):
            self.put(self.DATA, target[2], self._function.bar_read(*target))

    def after_write(self, offset: int, size: int) -> None:
        target = self._target()
        if target is not None and self._touches_data(offset, size):
            self._function.bar_write(*target, self.get(self.DATA, target[2]))


def virtio_capabilities(function: PciFunction, config_len: int, nqueues: int) -> list[Capability]:
    """The capabilities that describe BAR 0 to the driver of `function` (a device with
    `config_len` bytes of device configuration and `nqueues` queues), in list order: common,
    ISR, device (if it has a configuration), notify and the PCI-config window."""
    caps = [
        _virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE),
        _virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE),
    ]
    if config_len:
        caps.append(_virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, config_len))
    caps.append(
        _virtio_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            NOTIFY_MULTIPLIER * nqueues,
            struct.pack("<I", NOTIFY_MULTIPLIER),
        )
    )
    caps.append(PciCfgCapability(function))
    return caps
