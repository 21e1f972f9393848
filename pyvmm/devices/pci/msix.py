"""MSI-X (PCI Local Bus 3.0 §6.8.2): the capability, the vector table and the pending-bit array.

Each vector is an eventfd that, while the vector is live (MSI-X enabled, function not masked,
vector not masked), is a KVM irqfd on an MSI route (pyvmm.devices.pci.vectors, which also says
how a masked vector's signals pend in its eventfd: that is the PBA).

The table lives in a trapped BAR region: the owning function forwards accesses at its table and
PBA offsets to `table_read` / `table_write` / `pba_read`. Guest writes of any size, alignment or
value are accepted. `on_control(enabled, masked)` tells an owner that forwards the vectors to a
device (VFIO) when the guest turns MSI-X on or off.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyvmm.devices.pci.capability import PCI_CAP_ID_MSIX, Capability
from pyvmm.devices.pci.vectors import IrqfdVectors

if TYPE_CHECKING:
    from pyvmm.kvm.irq import GsiRouting
    from pyvmm.kvm.vm import Vm

# The capability: ID, next, Message Control (table size - 1 | function mask | enable), then the
# table's and the PBA's BAR indicator | offset.
MSIX_FLAGS = 2
MSIX_FLAGS_MASKALL = 0x4000
MSIX_FLAGS_ENABLE = 0x8000

ENTRY_SIZE = 16
ENTRY_ADDR_LO = 0
ENTRY_ADDR_HI = 4
ENTRY_DATA = 8
ENTRY_CTRL = 12
ENTRY_CTRL_MASKBIT = 0x1
MAX_VECTORS = 2048
# Address and data are fully writable; of vector control only the mask bit is.
_ENTRY_WMASK = b"\xff" * 12 + b"\x01\x00\x00\x00"


@dataclass
class MsixState:
    """What a snapshot needs: the enable and function-mask bits, the table, the pending set."""

    enabled: bool = False
    masked: bool = False
    table: bytes = b""
    pending: list[int] = field(default_factory=list)


class MsixCapability(Capability):
    """The 12-byte MSI-X capability; only Message Control's enable and mask bits are writable."""

    def __init__(self, msix: Msix, table: tuple[int, int], pba: tuple[int, int]) -> None:
        body = struct.pack(
            "<HII",
            msix.vectors - 1,
            table[1] | table[0],
            pba[1] | pba[0],
        )
        wmask = struct.pack("<HII", MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL, 0, 0)
        super().__init__(PCI_CAP_ID_MSIX, body, wmask)
        self._msix = msix

    def after_write(self, offset: int, size: int) -> None:
        if offset < MSIX_FLAGS + 2 and offset + size > MSIX_FLAGS:
            self._msix.set_control(self.get(MSIX_FLAGS, 2))


class Msix:
    """The MSI-X vectors of one function, each an eventfd, a GSI and (while live) an irqfd.

    `table` and `pba` are (BAR index, offset in that BAR); both offsets must be 8-byte aligned.
    Add `capability` to the function, and forward BAR accesses in [table offset, + table_size)
    and [pba offset, + pba_size) to `table_read/table_write` and `pba_read`.
    """

    def __init__(
        self,
        vm: Vm,
        gsi: GsiRouting,
        vectors: int,
        *,
        table: tuple[int, int],
        pba: tuple[int, int],
        on_control: Callable[[bool, bool], None] | None = None,
    ) -> None:
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X supports 1 to {MAX_VECTORS} vectors, not {vectors}")
        if table[1] % 8 or pba[1] % 8 or table[0] > 5 or pba[0] > 5:
            raise ValueError("MSI-X table and PBA need a BAR index 0-5 and 8-byte alignment")
        self.vectors = vectors
        self.table, self.pba = table, pba  # (BAR index, offset in it)
        self.table_size = vectors * ENTRY_SIZE
        self.pba_size = (vectors + 63) // 64 * 8
        self._lock = threading.Lock()
        self._enabled = False
        self._masked = False
        self._table = bytearray(self.table_size)
        self._irqs = IrqfdVectors(vm, gsi, vectors, "MSI-X")
        self.eventfds = self._irqs.eventfds
        self._on_control = on_control
        for vector in range(vectors):
            self._put(vector, ENTRY_CTRL, ENTRY_CTRL_MASKBIT)  # vectors reset masked
        self.capability = MsixCapability(self, table, pba)

    # raising (any thread, lock-free)

    def signal(self, vector: int) -> None:
        """Raise `vector`: delivered now if live, else left pending. Out-of-range is ignored
        (e.g. a virtio queue whose vector the guest never set)."""
        self._irqs.signal(vector)

    # the guest's view

    def set_control(self, control: int) -> None:
        """Message Control was written: re-evaluate every vector if enable or mask changed."""
        with self._lock:
            enabled = bool(control & MSIX_FLAGS_ENABLE)
            masked = bool(control & MSIX_FLAGS_MASKALL)
            if (enabled, masked) == (self._enabled, self._masked):
                return
            self._enabled, self._masked = enabled, masked
            self._sync(range(self.vectors))
        if self._on_control is not None:
            self._on_control(enabled, masked)

    def table_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.table_size:
            return (1 << (8 * size)) - 1
        with self._lock:
            return int.from_bytes(self._table[offset : offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > self.table_size:
            return
        with self._lock:
            for i in range(size):
                mask = _ENTRY_WMASK[(offset + i) % ENTRY_SIZE]
                byte = (value >> (8 * i)) & 0xFF
                old = self._table[offset + i]
                self._table[offset + i] = (old & ~mask) | (byte & mask)
            self._sync(range(offset // ENTRY_SIZE, (offset + size - 1) // ENTRY_SIZE + 1))

    def pba_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.pba_size:
            return (1 << (8 * size)) - 1
        first = offset * 8
        with self._lock:
            pending = self._irqs.pending(range(first, min(first + 8 * size, self.vectors)))
        return sum(1 << (vector - first) for vector in pending)

    # vector state

    def _get(self, vector: int, field_offset: int) -> int:
        return struct.unpack_from("<I", self._table, vector * ENTRY_SIZE + field_offset)[0]

    def _put(self, vector: int, field_offset: int, value: int) -> None:
        struct.pack_into("<I", self._table, vector * ENTRY_SIZE + field_offset, value)

    def _live(self, vector: int) -> bool:
        return (
            self._enabled
            and not self._masked
            and not self._get(vector, ENTRY_CTRL) & ENTRY_CTRL_MASKBIT
        )

    def _message(self, vector: int) -> tuple[int, int] | None:
        """The vector's (address, data) while it is live, else None."""
        if not self._live(vector):
            return None
        address = self._get(vector, ENTRY_ADDR_HI) << 32 | self._get(vector, ENTRY_ADDR_LO)
        return address, self._get(vector, ENTRY_DATA)

    def _sync(self, vectors: range) -> None:
        """Make KVM match the vectors' table entries, in one routing commit (called with the
        lock held)."""
        self._irqs.sync_all({vector: self._message(vector) for vector in vectors})

    # snapshot

    def save(self) -> MsixState:
        with self._lock:
            return MsixState(
                enabled=self._enabled,
                masked=self._masked,
                table=bytes(self._table),
                pending=self._irqs.pending(range(self.vectors)),
            )

    def restore(self, state: MsixState) -> None:
        if len(state.table) != self.table_size:
            raise ValueError(
                f"MSI-X state has a {len(state.table)}-byte table, this function {self.table_size}"
            )
        with self._lock:
            self._irqs.clear()
            self._enabled, self._masked = state.enabled, state.masked
            self._table[:] = state.table
            self._sync(range(self.vectors))
        if self._on_control is not None:  # a device behind it (VFIO) follows the restored bits
            self._on_control(state.enabled, state.masked)
        for vector in state.pending:
            self.signal(vector)

    def close(self) -> None:
        with self._lock:
            self._irqs.close()
