"""The split virtqueue (virtio 1.2 §2.7): descriptor table, available ring and used ring in guest
memory, read and written through the device's DMA view only (pyvmm.machine.dma), so addresses
are bus addresses, translated in that one place once a virtual IOMMU exists.

Everything the driver put in guest memory is hostile. `activate` checks the ring geometry, and
`pop` checks each chain as it walks it: every buffer must lie inside one RAM region, the head and
every `next` index must be inside its table, a chain may not be longer than its table (which is
how a loop is caught), an indirect table must be a non-zero multiple of 16 bytes no larger than
`MAX_INDIRECT`, may not be nested or chained with NEXT, writable buffers must follow readable
ones, and a chain's byte count must fit the used ring's 32-bit length. Any violation raises
`VirtqueueError`; the transport then marks the device DEVICE_NEEDS_RESET and stops using the
queue. Nothing here accesses memory outside a RAM region (the DMA view refuses to).

Every piece of a chain handed out for writing is reported to the view again when the chain is
pushed back, so the dirty log marks a page after the device finished writing it, not only
before (a dirty-log read in between would otherwise lose the write).

A queue is not thread-safe: the transport serialises the vCPU thread (configuration) and the
device worker (processing) with its own lock.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass, field

from pyvmm.machine.dma import DmaView
from pyvmm.machine.memory import GuestMemoryError

log = logging.getLogger(__name__)

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768
MAX_INDIRECT = 1024  # descriptors in one indirect table (QEMU's limit too)
MAX_CHAIN_BYTES = 0xFFFF_FFFF  # what a used element's length can report
NO_VECTOR = 0xFFFF

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

# A full memory barrier. The event-index protocol needs store->load ordering between this
# thread's ring writes and its next read of the driver's fields (virtio_mb() in Linux); x86 only
# reorders exactly that, and Python cannot emit MFENCE. Taking a lock executes a LOCK-prefixed
# instruction (glibc's futex fast path), which is a full barrier on x86.
_fence_lock = threading.Lock()


def _full_barrier() -> None:
    with _fence_lock:
        pass


class VirtqueueError(Exception):
    """The driver put something invalid in the queue; the device needs a reset."""


@dataclass(frozen=True)
class Buffer:
    """One guest buffer of a chain: `length` bytes at guest-physical `gpa`, inside RAM."""

    gpa: int
    length: int


@dataclass
class DescriptorChain:
    """The buffers of one available descriptor chain, device-readable ones first.

    Byte offsets below are into the concatenation of the readable (or writable) buffers.
    """

    dma: DmaView
    head: int
    readable: list[Buffer] = field(default_factory=list)
    writable: list[Buffer] = field(default_factory=list)
    # the (gpa, length) pieces handed out to write into, reported again when pushed
    written: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(b.length for b in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(b.length for b in self.writable)

    def _views(
        self, buffers: list[Buffer], offset: int, length: int, *, write: bool
    ) -> list[memoryview]:
        view_of = self.dma.writable if write else self.dma.readable
        views = []
        for buf in buffers:
            if length <= 0:
                break
            if offset >= buf.length:
                offset -= buf.length
                continue
            take = min(buf.length - offset, length)
            views.append(view_of(buf.gpa + offset, take))
            if write:
                self.written.append((buf.gpa + offset, take))
            length -= take
            offset = 0
        return views

    def readable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Views of guest RAM covering readable bytes [offset, offset + length)."""
        total = self.readable_len
        length = total - offset if length is None else length
        return self._views(self.readable, offset, length, write=False)

    def writable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        total = self.writable_len
        length = total - offset if length is None else length
        return self._views(self.writable, offset, length, write=True)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Readable bytes [offset, offset + length), fewer if the chain is shorter."""
        return b"".join(bytes(v) for v in self.readable_views(offset, length))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Copy `data` into the writable bytes from `offset`; returns how many fitted."""
        done = 0
        for view in self.writable_views(offset, len(data)):
            view[:] = data[done : done + len(view)]
            done += len(view)
        return done


@dataclass
class QueueState:
    """A queue's configuration and ring positions, for snapshots."""

    size: int
    ready: bool
    desc: int
    driver: int
    device: int
    msix_vector: int
    next_avail: int
    next_used: int
    signalled_used: int
    event_idx: bool
    indirect: bool
    broken: bool


class Virtqueue:
    """One split virtqueue. The transport sets `size`, the three ring addresses and
    `msix_vector` from the driver's writes, the negotiated `event_idx` / `indirect` features,
    then calls `activate()`."""

    def __init__(self, dma: DmaView, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to 32768")
        self.dma = dma
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc = 0
        self.driver = 0
        self.device = 0
        self.msix_vector = NO_VECTOR
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used = 0
        self.event_idx = False
        self.indirect = False
        self.broken = False

    def activate(self) -> None:
        """The driver enabled the queue: check its geometry and start using it."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two up to {self.max_size}")
        # Alignment (virtio 1.2 §2.7.10.1): descriptors 16, available ring 2, used ring 4.
        rings = (
            ("descriptor table", self.desc, DESC_SIZE * size, 16),
            ("available ring", self.driver, 6 + 2 * size, 2),
            ("used ring", self.device, 6 + 8 * size, 4),
        )
        for name, addr, length, align in rings:
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            self._check_ram(name, addr, length)
        self.ready = True

    def _check_ram(self, what: str, addr: int, length: int) -> None:
        try:
            self.dma.check(addr, length)
        except GuestMemoryError as err:
            raise VirtqueueError(f"{what}: {err}") from None

    # driver -> device

    def _u16(self, gpa: int) -> int:
        return _U16.unpack(self.dma.readable(gpa, 2))[0]

    def _avail_idx(self) -> int:
        return self._u16(self.driver + 2)

    def has_available(self) -> bool:
        """Whether the driver has made buffers available that `pop` has not returned yet."""
        return self.ready and not self.broken and self._avail_idx() != self.next_avail

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None. Raises VirtqueueError on a malformed ring."""
        if not self.ready or self.broken:
            return None
        pending = (self._avail_idx() - self.next_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(
                f"available index moved {pending} entries ahead on a queue of {self.size}"
            )
        head = self._u16(self.driver + 4 + 2 * (self.next_avail % self.size))
        chain = self._walk(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        if self.event_idx:
            # avail_event: ask for a notification as soon as the driver adds anything.
            self.dma.write(self.device + 4 + 8 * self.size, _U16.pack(self.next_avail))
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise VirtqueueError(f"head index {head} is outside a queue of {self.size}")
        chain = DescriptorChain(self.dma, head)
        table, table_len, index = self.desc, self.size, head
        in_indirect = False
        seen = 0
        total = 0
        while True:
            addr, length, flags, next_index = _DESC.unpack(
                self.dma.readable(table + DESC_SIZE * index, DESC_SIZE)
            )
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if in_indirect:
                    raise VirtqueueError("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("indirect descriptor with VIRTQ_DESC_F_NEXT")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise VirtqueueError(f"indirect table of {length} bytes")
                self._check_ram("indirect table", addr, length)
                table, table_len, index = addr, length // DESC_SIZE, 0
                in_indirect = True
                seen = 0
                continue
            seen += 1
            if seen > table_len:
                raise VirtqueueError(f"descriptor chain from head {head} loops")
            self._check_ram(f"buffer of descriptor {index}", addr, length)
            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtqueueError(f"descriptor chain from head {head} exceeds 4 GiB")
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append(Buffer(addr, length))
            elif chain.writable:
                raise VirtqueueError("device-readable descriptor after a device-writable one")
            else:
                chain.readable.append(Buffer(addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if next_index >= table_len:
                raise VirtqueueError(f"next index {next_index} is outside a table of {table_len}")
            index = next_index

    # device -> driver

    def push(self, chain: DescriptorChain, length: int) -> None:
        """Return `chain` to the driver with `length` bytes written into it."""
        head = chain.head
        if not 0 <= head < self.size or not 0 <= length <= MAX_CHAIN_BYTES:
            raise ValueError(f"used element ({head}, {length}) is invalid")
        for gpa, written in chain.written:  # the device is done writing them now
            self.dma.written(gpa, written)
        slot = self.device + 4 + 8 * (self.next_used % self.size)
        self.dma.write(slot, _USED_ELEM.pack(head, length))
        # The element is visible before the index that publishes it (x86 keeps stores in order).
        self.next_used = (self.next_used + 1) & 0xFFFF
        self.dma.write(self.device + 2, _U16.pack(self.next_used))

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call:
        VIRTQ_AVAIL_F_NO_INTERRUPT, or with VIRTIO_F_EVENT_IDX the used_event index."""
        old, new = self.signalled_used, self.next_used
        if old == new or not self.ready:
            return False
        self.signalled_used = new
        _full_barrier()
        if self.event_idx:
            used_event = self._u16(self.driver + 4 + 2 * self.size)
            # vring_need_event(): did `new` step past used_event since `old`?
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self._u16(self.driver) & VIRTQ_AVAIL_F_NO_INTERRUPT

    # snapshot

    def save(self) -> QueueState:
        return QueueState(
            size=self.size,
            ready=self.ready,
            desc=self.desc,
            driver=self.driver,
            device=self.device,
            msix_vector=self.msix_vector,
            next_avail=self.next_avail,
            next_used=self.next_used,
            signalled_used=self.signalled_used,
            event_idx=self.event_idx,
            indirect=self.indirect,
            broken=self.broken,
        )

    def restore(self, state: QueueState) -> None:
        """Bring back a saved queue; a ring that no longer validates leaves it broken."""
        self.reset()
        for name, value in vars(state).items():
            setattr(self, name, value)
        if self.ready and not self.broken:
            try:
                self.activate()
            except VirtqueueError as err:
                log.warning("restored queue is invalid: %s", err)
                self.broken = True
