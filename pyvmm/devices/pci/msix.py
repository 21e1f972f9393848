"""MSI-X (PCI Local Bus 3.0 §6.8.2): the capability, the vector table and the pending-bit array.

Each vector owns an eventfd. While the vector is live (MSI-X enabled, function not masked,
vector not masked) the eventfd is a KVM irqfd on a GSI whose MSI route carries the vector's
address and data, so raising it — from a device worker here, from the device itself under VFIO —
is one eventfd write that KVM turns into an interrupt without Python or a vCPU in the way.

Masking removes the irqfd. Signals then accumulate in the eventfd's counter, which *is* the
pending bit: the PBA reads it with a zero-timeout poll, and unmasking re-assigns the irqfd, which
KVM fires at once if the counter is non-zero (kvm_irqfd_assign polls for an event already
pending; it does not consume it, so the counter is then cleared here). The same scheme works
unchanged when VFIO signals the eventfds.

The table lives in a trapped BAR region: the owning function forwards accesses at its table and
PBA offsets to `table_read` / `table_write` / `pba_read`. Guest writes of any size, alignment or
value are accepted; a route KVM refuses leaves that vector without an interrupt, logged.
"""

from __future__ import annotations

import logging
import select
import struct
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyvmm.devices.pci.capability import PCI_CAP_ID_MSIX, Capability
from pyvmm.kvm.errors import KvmError
from pyvmm.kvm.eventfd import EventFd

if TYPE_CHECKING:
    from pyvmm.kvm.irq import GsiRouting
    from pyvmm.kvm.vm import Vm

log = logging.getLogger(__name__)

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
_ERRORS = (OSError, KvmError, RuntimeError)


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
    ) -> None:
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X supports 1 to {MAX_VECTORS} vectors, not {vectors}")
        if table[1] % 8 or pba[1] % 8 or table[0] > 5 or pba[0] > 5:
            raise ValueError("MSI-X table and PBA need a BAR index 0-5 and 8-byte alignment")
        self._vm = vm
        self._gsi_routing = gsi
        self.vectors = vectors
        self.table_size = vectors * ENTRY_SIZE
        self.pba_size = (vectors + 63) // 64 * 8
        self._lock = threading.Lock()
        self._enabled = False
        self._masked = False
        self._table = bytearray(self.table_size)
        self._gsi: list[int | None] = [None] * vectors
        self._route: list[tuple[int, int] | None] = [None] * vectors
        self._attached = [False] * vectors
        self._stack = ExitStack()
        self.eventfds = [self._stack.enter_context(EventFd()) for _ in range(vectors)]
        for vector in range(vectors):
            self._put(vector, ENTRY_CTRL, ENTRY_CTRL_MASKBIT)  # vectors reset masked
        self.capability = MsixCapability(self, table, pba)

    # raising (any thread, lock-free)

    def signal(self, vector: int) -> None:
        """Raise `vector`: delivered now if live, else left pending. Out-of-range is ignored
        (e.g. a virtio queue whose vector the guest never set)."""
        if 0 <= vector < self.vectors:
            self.eventfds[vector].signal()

    # the guest's view

    def set_control(self, control: int) -> None:
        """Message Control was written: re-evaluate every vector if enable or mask changed."""
        with self._lock:
            enabled = bool(control & MSIX_FLAGS_ENABLE)
            masked = bool(control & MSIX_FLAGS_MASKALL)
            if (enabled, masked) == (self._enabled, self._masked):
                return
            self._enabled, self._masked = enabled, masked
            for vector in range(self.vectors):
                self._sync(vector)

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
            for vector in range(offset // ENTRY_SIZE, (offset + size - 1) // ENTRY_SIZE + 1):
                self._sync(vector)

    def pba_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.pba_size:
            return (1 << (8 * size)) - 1
        first = offset * 8
        with self._lock:
            pending = self._pending(range(first, min(first + 8 * size, self.vectors)))
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

    def _pending(self, vectors: range) -> list[int]:
        """Vectors in `vectors` that are not live and have an unconsumed signal."""
        poller = select.poll()
        candidates = {}
        for vector in vectors:
            if not self._attached[vector]:
                fd = self.eventfds[vector].fd
                candidates[fd] = vector
                poller.register(fd, select.POLLIN)
        if not candidates:
            return []
        return sorted(candidates[fd] for fd, _ in poller.poll(0))

    def _sync(self, vector: int) -> None:
        """Make KVM match the vector's table entry: route it and attach the irqfd if live,
        detach it if not. Called with the lock held."""
        fd = self.eventfds[vector].fd
        if not self._live(vector):
            if self._attached[vector]:
                self._detach(vector, fd)
            return
        address = self._get(vector, ENTRY_ADDR_HI) << 32 | self._get(vector, ENTRY_ADDR_LO)
        message = (address, self._get(vector, ENTRY_DATA))
        gsi = self._gsi[vector]
        try:
            if gsi is None:
                gsi = self._gsi[vector] = self._gsi_routing.allocate_gsi()
            if self._route[vector] != message:
                self._route[vector] = None
                self._gsi_routing.set_msi(gsi, *message)
                self._route[vector] = message
            if not self._attached[vector]:
                self._vm.irqfd(fd, gsi)
                self._attached[vector] = True
                # KVM_IRQFD injected a signal already in the counter but left the counter as
                # is (later signals are consumed as they come); clear it, or a later mask
                # would show it as pending and deliver it twice.
                self.eventfds[vector].read()
        except _ERRORS as err:
            log.warning(
                "MSI-X vector %d (address %#x data %#x) has no interrupt route: %s",
                vector,
                *message,
                err,
            )
            self._drop_route(vector)

    def _detach(self, vector: int, fd: int) -> None:
        gsi = self._gsi[vector]
        assert gsi is not None
        try:
            self._vm.irqfd_remove(fd, gsi)
        except _ERRORS as err:
            log.warning("MSI-X vector %d: removing its irqfd failed: %s", vector, err)
        self._attached[vector] = False

    def _drop_route(self, vector: int) -> None:
        """Forget a vector's GSI after KVM refused its route, so that the bad route does not
        stay in the table and make every later commit fail."""
        gsi = self._gsi[vector]
        if gsi is None:
            return
        if self._attached[vector]:
            self._detach(vector, self.eventfds[vector].fd)
        self._gsi[vector] = None
        self._route[vector] = None
        self._gsi_routing.release_gsi(gsi)
        try:
            self._gsi_routing.commit()
        except _ERRORS as err:
            log.warning("GSI routing commit failed after dropping GSI %d: %s", gsi, err)

    # snapshot

    def save(self) -> MsixState:
        with self._lock:
            return MsixState(
                enabled=self._enabled,
                masked=self._masked,
                table=bytes(self._table),
                pending=self._pending(range(self.vectors)),
            )

    def restore(self, state: MsixState) -> None:
        if len(state.table) != self.table_size:
            raise ValueError(
                f"MSI-X state has a {len(state.table)}-byte table, this function {self.table_size}"
            )
        with self._lock:
            for eventfd in self.eventfds:
                eventfd.read()
            self._enabled, self._masked = state.enabled, state.masked
            self._table[:] = state.table
            for vector in range(self.vectors):
                self._sync(vector)
        for vector in state.pending:
            self.signal(vector)

    def close(self) -> None:
        with self._lock:
            for vector in range(self.vectors):
                if self._attached[vector]:
                    self._detach(vector, self.eventfds[vector].fd)
                gsi = self._gsi[vector]
                if gsi is not None:
                    self._gsi_routing.release_gsi(gsi)
                    self._gsi[vector] = None
            self._stack.close()
