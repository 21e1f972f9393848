"""MSI (PCI Local Bus 3.0 §6.8.1): the capability and its vectors, emulated.

The capability's registers live in config space: Message Control (enable; Multiple Message
Capable, read-only; Multiple Message Enable; 64-bit and per-vector-masking capable, read-only),
the message address (low, and high when 64-bit), the message data, and with per-vector masking
the mask and pending bits. With n = 2^MME vectors enabled, vector i sends the message data with
its low log2(n) bits replaced by i.

Each vector is an eventfd fed to KVM through an irqfd on an MSI route while it is live (enabled,
below n, not masked): pyvmm.devices.pci.vectors. The pending bits read the eventfds of vectors
that are not live. `on_control(vectors)` tells an owner that forwards the vectors to a device
(VFIO) how many the guest enabled (0: MSI off).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyvmm.devices.pci.capability import PCI_CAP_ID_MSI, Capability
from pyvmm.devices.pci.vectors import IrqfdVectors

if TYPE_CHECKING:
    from pyvmm.kvm.irq import GsiRouting
    from pyvmm.kvm.vm import Vm

MSI_FLAGS = 2  # Message Control, from the capability's start
MSI_FLAGS_ENABLE = 0x0001
MSI_FLAGS_QMASK = 0x000E  # Multiple Message Capable: log2 of the vectors offered
MSI_FLAGS_QSIZE = 0x0070  # Multiple Message Enable: log2 of the vectors enabled
MSI_FLAGS_64BIT = 0x0080
MSI_FLAGS_MASKBIT = 0x0100
MAX_VECTORS = 32


class MsiCapability(Capability):
    """The MSI capability: `vectors` (a power of two, at most 32), with or without 64-bit
    addresses and per-vector masking, laid out as the specification says for that choice."""

    def __init__(self, msi: Msi, vectors: int, *, is_64bit: bool, maskable: bool) -> None:
        control = (vectors.bit_length() - 1) << 1
        control |= MSI_FLAGS_64BIT if is_64bit else 0
        control |= MSI_FLAGS_MASKBIT if maskable else 0
        self.address_hi = 6 if is_64bit else None  # offsets in the capability, after ID/next
        self.data = 10 if is_64bit else 6
        self.mask = self.data + 4 if maskable else None
        self.pending = self.data + 8 if maskable else None
        length = (self.pending + 4) if self.pending is not None else self.data + 2
        body = bytearray(length)
        struct.pack_into("<H", body, 0, control)
        wmask = bytearray(length)
        struct.pack_into("<H", wmask, 0, MSI_FLAGS_ENABLE | MSI_FLAGS_QSIZE)
        struct.pack_into("<I", wmask, 2, 0xFFFFFFFC)
        if self.address_hi is not None:
            struct.pack_into("<I", wmask, self.address_hi, 0xFFFFFFFF)
        struct.pack_into("<H", wmask, self.data, 0xFFFF)
        if self.mask is not None:
            struct.pack_into("<I", wmask, self.mask, (1 << vectors) - 1)
        super().__init__(PCI_CAP_ID_MSI, bytes(body), bytes(wmask))
        self._msi = msi

    # offsets below are within the capability, so the body's are 2 more

    def control(self) -> int:
        return self.get(MSI_FLAGS, 2)

    def message(self) -> tuple[int, int]:
        address = self.get(4, 4)
        if self.address_hi is not None:
            address |= self.get(2 + self.address_hi, 4) << 32
        return address, self.get(2 + self.data, 2)

    def mask_bits(self) -> int:
        return self.get(2 + self.mask, 4) if self.mask is not None else 0

    def before_read(self, offset: int, size: int) -> None:
        if self.pending is not None and offset + size > 2 + self.pending:
            self.put(2 + self.pending, 4, self._msi.pending_bits())

    def after_write(self, offset: int, size: int) -> None:
        self._msi.update()


class Msi:
    """The MSI vectors of one function. Add `capability` to the function."""

    def __init__(
        self,
        vm: Vm,
        gsi: GsiRouting,
        vectors: int,
        *,
        is_64bit: bool = True,
        maskable: bool = False,
        on_control: Callable[[int], None] | None = None,
    ) -> None:
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"MSI offers 1 to {MAX_VECTORS} vectors, a power of two: {vectors}")
        self.vectors = vectors
        self._lock = threading.Lock()
        self._irqs = IrqfdVectors(vm, gsi, vectors, "MSI")
        self.eventfds = self._irqs.eventfds
        self._on_control = on_control
        self._enabled = 0  # vectors enabled: 0 while MSI is off
        self.capability = MsiCapability(self, vectors, is_64bit=is_64bit, maskable=maskable)

    def signal(self, vector: int) -> None:
        self._irqs.signal(vector)

    def enabled_vectors(self) -> int:
        """How many vectors the guest enabled (0: MSI is off)."""
        control = self.capability.control()
        if not control & MSI_FLAGS_ENABLE:
            return 0
        offered = (control & MSI_FLAGS_QMASK) >> 1
        return 1 << min((control & MSI_FLAGS_QSIZE) >> 4, offered)

    def update(self) -> None:
        """Re-read the capability after a guest write: routes, irqfds, the owner's vectors."""
        with self._lock:
            enabled = self.enabled_vectors()
            address, data = self.capability.message()
            masked = self.capability.mask_bits()
            messages = {}
            for vector in range(self.vectors):
                live = vector < enabled and not masked >> vector & 1
                messages[vector] = (address, data & ~(enabled - 1) | vector) if live else None
            self._irqs.sync_all(messages)
            changed, self._enabled = enabled != self._enabled, enabled
        if changed and self._on_control is not None:
            self._on_control(enabled)

    def pending_bits(self) -> int:
        with self._lock:
            return sum(1 << vector for vector in self._irqs.pending(range(self.vectors)))

    def close(self) -> None:
        with self._lock:
            self._irqs.close()
