"""virtio without KVM: the split virtqueue against hostile rings (hypothesis), the MSI-X table,
and the virtio-pci transport driven through its registers as a driver would.

Guest RAM is real (`RamRegion`s: memfd + mmap, no KVM needed); the VM and GSI routing are fakes
that record what would have been asked of KVM.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from fakes import FakeGsi, FakeVm, readable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pcibench import put_desc, virtio_device

from pyvmm.devices.pci.capability import PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR
from pyvmm.devices.pci.device import PCI_BASE_ADDRESS_0, PCI_COMMAND, PCI_COMMAND_MASTER
from pyvmm.devices.pci.msix import Msix
from pyvmm.devices.virtio import pci as vpci
from pyvmm.devices.virtio import pci_common, pci_layout
from pyvmm.devices.virtio.backend import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from pyvmm.devices.virtio.queue import (
    MAX_CHAIN_BYTES,
    MAX_INDIRECT,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
)
from pyvmm.machine.dma import IdentityDma
from pyvmm.machine.memory import GuestMemory, RamRegion

MiB = 1 << 20
LOW = (0, 1 * MiB)  # RAM at [0, 1 MiB) and [256 MiB, +64 KiB), a hole between
HIGH = (0x1000_0000, 0x10000)
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000  # ring addresses used by most tests
W, N, IND = VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT


@contextlib.contextmanager
def guest_memory(*ranges: tuple[int, int]) -> Iterator[GuestMemory]:
    memory = GuestMemory()
    for gpa, size in ranges or (LOW, HIGH):
        memory.add(RamRegion(gpa, size))
    try:
        yield memory
    finally:
        memory.close()


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with guest_memory() as mem:
        yield mem


def make_queue(
    mem: GuestMemory, size: int = 8, *, indirect: bool = True, event_idx: bool = False
) -> Virtqueue:
    queue = Virtqueue(IdentityDma(mem), 256)
    queue.size, queue.desc, queue.driver, queue.device = size, DESC, AVAIL, USED
    queue.indirect, queue.event_idx = indirect, event_idx
    queue.activate()
    return queue


def offer(mem: GuestMemory, queue: Virtqueue, *heads: int) -> None:
    """Driver side: append heads to the available ring and publish them."""
    idx = struct.unpack("<H", mem.read(AVAIL + 2, 2))[0]
    for head in heads:
        mem.write(AVAIL + 4 + 2 * (idx % queue.size), struct.pack("<H", head))
        idx = (idx + 1) & 0xFFFF
    mem.write(AVAIL + 2, struct.pack("<H", idx))


def used_ring(mem: GuestMemory, queue: Virtqueue) -> tuple[int, list[tuple[int, int]]]:
    idx = struct.unpack("<H", mem.read(USED + 2, 2))[0]
    elems = [struct.unpack("<II", mem.read(USED + 4 + 8 * i, 8)) for i in range(queue.size)]
    return idx, elems


# well-formed rings


def test_chain_of_readable_then_writable_buffers(memory: GuestMemory) -> None:
    queue = make_queue(memory)
    put_desc(memory, DESC, 3, 0x10000, 16, N, 5)
    put_desc(memory, DESC, 5, 0x10100, 100, N | W, 1)
    put_desc(memory, DESC, 1, HIGH[0], 1, W)
    memory.write(0x10000, b"0123456789abcdef")
    offer(memory, queue, 3)
    chain = queue.pop()
    assert chain is not None and queue.pop() is None
    assert chain.head == 3
    assert [(b.gpa, b.length) for b in chain.readable] == [(0x10000, 16)]
    assert [(b.gpa, b.length) for b in chain.writable] == [(0x10100, 100), (HIGH[0], 1)]
    assert chain.read(4, 6) == b"456789"
    assert chain.write(98, b"xyz!") == 3  # spans the two writable buffers, one byte too many
    assert memory.read(0x10100 + 98, 2) == b"xy" and memory.read(HIGH[0], 1) == b"z"
    queue.push(chain, 101)
    assert used_ring(memory, queue)[0] == 1
    assert used_ring(memory, queue)[1][0] == (3, 101)


def test_indirect_table(memory: GuestMemory) -> None:
    queue = make_queue(memory)
    table = 0x20000
    put_desc(memory, table, 0, 0x30000, 8, N, 2)
    put_desc(memory, table, 2, 0x30010, 8, N | W, 1)
    put_desc(memory, table, 1, 0x30020, 4, W)
    put_desc(memory, DESC, 0, 0x40000, 4, N, 1)  # a direct buffer may precede the table
    put_desc(memory, DESC, 1, table, 3 * 16, IND)
    offer(memory, queue, 0)
    chain = queue.pop()
    assert chain is not None
    assert [b.gpa for b in chain.readable] == [0x40000, 0x30000]
    assert [b.gpa for b in chain.writable] == [0x30010, 0x30020]


def test_ring_wraps_around_the_16_bit_index(memory: GuestMemory) -> None:
    queue = make_queue(memory, 4)
    memory.write(AVAIL + 2, struct.pack("<H", 0xFFFE))
    queue.next_avail = queue.next_used = 0xFFFE
    put_desc(memory, DESC, 0, 0x10000, 1, W)
    for _ in range(4):
        offer(memory, queue, 0)
        chain = queue.pop()
        assert chain is not None
        queue.push(chain, 1)
    assert queue.next_avail == 2 and used_ring(memory, queue)[0] == 2


def test_interrupt_suppression_flag_and_event_idx(memory: GuestMemory) -> None:
    queue = make_queue(memory)
    put_desc(memory, DESC, 0, 0x10000, 1, W)
    assert not queue.needs_interrupt()  # nothing used yet
    offer(memory, queue, 0)
    queue.push(queue.pop(), 1)  # type: ignore[arg-type]
    memory.write(AVAIL, struct.pack("<H", VIRTQ_AVAIL_F_NO_INTERRUPT))
    assert not queue.needs_interrupt()
    memory.write(AVAIL, struct.pack("<H", 0))
    offer(memory, queue, 0)
    queue.push(queue.pop(), 1)  # type: ignore[arg-type]
    assert queue.needs_interrupt()

    queue = make_queue(memory, event_idx=True)
    used_event = AVAIL + 4 + 2 * queue.size
    memory.write(used_event, struct.pack("<H", 1))  # interrupt once used idx passes 1
    memory.write(AVAIL + 2, struct.pack("<H", 0))
    offer(memory, queue, 0)
    queue.push(queue.pop(), 1)  # type: ignore[arg-type]
    avail_event = struct.unpack("<H", memory.read(USED + 4 + 8 * queue.size, 2))[0]
    assert avail_event == 1  # the device asks to hear about the next buffer
    assert not queue.needs_interrupt()  # used idx 1: not past used_event yet
    offer(memory, queue, 0)
    queue.push(queue.pop(), 1)  # type: ignore[arg-type]
    assert queue.needs_interrupt()  # used idx 2 stepped past 1


# hostile rings, one rule at a time


BAD_CHAINS: dict[str, Callable[[GuestMemory], int]] = {}


def bad(name: str) -> Callable[[Callable[[GuestMemory], int]], Callable[[GuestMemory], int]]:
    def register(build: Callable[[GuestMemory], int]) -> Callable[[GuestMemory], int]:
        BAD_CHAINS[name] = build
        return build

    return register


@bad("head outside the queue")
def _head(mem: GuestMemory) -> int:
    return 8


@bad("next outside the queue")
def _next(mem: GuestMemory) -> int:
    put_desc(mem, DESC, 0, 0x10000, 1, N, 8)
    return 0


@bad("loop")
def _loop(mem: GuestMemory) -> int:
    put_desc(mem, DESC, 0, 0x10000, 1, N, 1)
    put_desc(mem, DESC, 1, 0x10000, 1, N, 0)
    return 0


@bad("self loop")
def _self_loop(mem: GuestMemory) -> int:
    put_desc(mem, DESC, 2, 0x10000, 1, N, 2)
    return 2


@bad("buffer past the end of RAM")
def _past_ram(mem: GuestMemory) -> int:
    put_desc(mem, DESC, 0, LOW[1] - 4, 8, W)
    return 0


@bad("buffer across the hole between regions")
def _hole(mem: GuestMemory) -> int:
    put_desc(mem, DESC, 0, HIGH[0] - 1, 2)
    return 0


@bad("buffer wrapping the 64-bit address space")
def _wrap(mem: GuestMemory) -> int:
    put_desc(mem, DESC, 0, 2**64 - 16, 0x100)
    return 0


@bad("huge length")
def _huge(mem: GuestMemory) -> int:
    put_desc(mem, DESC, 0, 0, 0xFFFF_FFFF)
    return 0


@bad("readable after writable")
def _order(mem: GuestMemory) -> int:
    put_desc(mem, DESC, 0, 0x10000, 1, W | N, 1)
    put_desc(mem, DESC, 1, 0x10000, 1)
    return 0


@bad("zero-length indirect table")
def _indirect_empty(mem: GuestMemory) -> int:
    put_desc(mem, DESC, 0, 0x20000, 0, IND)
    return 0


@bad("indirect table not a multiple of 16")
def _indirect_odd(mem: GuestMemory) -> int:
    put_desc(mem, DESC, 0, 0x20000, 24, IND)
    return 0


@bad("indirect table too large")
def _indirect_large(mem: GuestMemory) -> int:
    put_desc(mem, DESC, 0, 0x20000, 16 * (MAX_INDIRECT + 1), IND)
    return 0


@bad("indirect table outside RAM")
def _indirect_outside(mem: GuestMemory) -> int:
    put_desc(mem, DESC, 0, LOW[1] - 16, 32, IND)
    return 0


@bad("nested indirect")
def _indirect_nested(mem: GuestMemory) -> int:
    put_desc(mem, 0x20000, 0, 0x20100, 16, IND)
    put_desc(mem, DESC, 0, 0x20000, 16, IND)
    return 0


@bad("indirect with NEXT")
def _indirect_next(mem: GuestMemory) -> int:
    put_desc(mem, 0x20000, 0, 0x10000, 1)
    put_desc(mem, DESC, 0, 0x20000, 16, IND | N, 1)
    put_desc(mem, DESC, 1, 0x10000, 1)
    return 0


@bad("loop inside an indirect table")
def _indirect_loop(mem: GuestMemory) -> int:
    put_desc(mem, 0x20000, 0, 0x10000, 1, N, 1)
    put_desc(mem, 0x20000, 1, 0x10000, 1, N, 0)
    put_desc(mem, DESC, 0, 0x20000, 32, IND)
    return 0


@bad("next outside an indirect table")
def _indirect_next_out(mem: GuestMemory) -> int:
    put_desc(mem, 0x20000, 0, 0x10000, 1, N, 2)
    put_desc(mem, DESC, 0, 0x20000, 32, IND)
    return 0


@pytest.mark.parametrize("name", sorted(BAD_CHAINS))
def test_malformed_chain_raises_virtqueue_error(memory: GuestMemory, name: str) -> None:
    queue = make_queue(memory)
    head = BAD_CHAINS[name](memory)
    offer(memory, queue, head)
    with pytest.raises(VirtqueueError):
        queue.pop()


def test_indirect_without_the_feature_is_refused(memory: GuestMemory) -> None:
    queue = make_queue(memory, indirect=False)
    put_desc(memory, 0x20000, 0, 0x10000, 1)
    put_desc(memory, DESC, 0, 0x20000, 16, IND)
    offer(memory, queue, 0)
    with pytest.raises(VirtqueueError, match="INDIRECT_DESC"):
        queue.pop()


def test_available_index_running_ahead_is_refused(memory: GuestMemory) -> None:
    queue = make_queue(memory, 4)
    memory.write(AVAIL + 2, struct.pack("<H", 5))
    with pytest.raises(VirtqueueError, match="ahead"):
        queue.pop()


def test_chain_bytes_must_fit_a_used_length() -> None:
    with guest_memory((0, 64 * MiB)) as mem:
        queue = make_queue(mem, 128)
        for i in range(64):  # 64 x 64 MiB = 4 GiB, one byte more than a u32 length
            put_desc(mem, DESC, i, 0, 64 * MiB, N, i + 1)
        put_desc(mem, DESC, 64, 0, 0)
        offer(mem, queue, 0)
        with pytest.raises(VirtqueueError, match="4 GiB"):
            queue.pop()
        assert MAX_CHAIN_BYTES == 2**32 - 1


@pytest.mark.parametrize(
    ("size", "desc", "avail", "used"),
    [
        (6, DESC, AVAIL, USED),  # not a power of two
        (0, DESC, AVAIL, USED),
        (512, DESC, AVAIL, USED),  # above the maximum
        (8, DESC + 8, AVAIL, USED),  # misaligned
        (8, DESC, AVAIL + 1, USED),
        (8, DESC, AVAIL, USED + 2),
        (8, LOW[1] - 64, AVAIL, USED),  # table runs out of RAM
        (8, DESC, AVAIL, 2**64 - 8),
    ],
)
def test_ring_geometry_is_checked(
    memory: GuestMemory, size: int, desc: int, avail: int, used: int
) -> None:
    queue = Virtqueue(IdentityDma(memory), 256)
    queue.size, queue.desc, queue.driver, queue.device = size, desc, avail, used
    with pytest.raises(VirtqueueError):
        queue.activate()
    assert not queue.ready


def test_queue_state_round_trip(memory: GuestMemory) -> None:
    queue = make_queue(memory, event_idx=True)
    put_desc(memory, DESC, 0, 0x10000, 1, W)
    offer(memory, queue, 0, 0)
    queue.push(queue.pop(), 1)  # type: ignore[arg-type]
    saved = queue.save()
    other = Virtqueue(IdentityDma(memory), 256)
    other.restore(saved)
    assert other.save() == saved
    assert other.pop() is not None  # carries on where the first left off
    saved.desc = LOW[1]  # a snapshot whose ring is no longer in RAM
    other.restore(saved)
    assert other.broken


# the fuzzer

# Mostly plausible values, so that chains get deep before something is wrong with them.
IN_RAM = st.one_of(
    st.integers(0x10000, 0x10100),
    st.integers(0, LOW[1] - 1),
    st.integers(HIGH[0], HIGH[0] + HIGH[1] - 1),
    st.sampled_from([0x20000, 0x20100, 0x20200]),  # where the fuzzer puts indirect tables
)
ADDRESSES = st.one_of(
    IN_RAM,
    IN_RAM,
    st.integers(0, 2**64 - 1),
    st.sampled_from([LOW[1] - 1, LOW[1], HIGH[0] - 1, HIGH[0] + HIGH[1] - 1, 2**64 - 1]),
)
LENGTHS = st.one_of(
    st.integers(0, 64),
    st.integers(0, 64),
    st.sampled_from([16, 32, 48, 16 * MAX_INDIRECT, 16 * (MAX_INDIRECT + 1)]),
    st.integers(0, 2**32 - 1),
)
PLAUSIBLE_FLAGS = st.sampled_from([0, N, W, N | W, IND, IND | N])
FLAGS = st.one_of(PLAUSIBLE_FLAGS, PLAUSIBLE_FLAGS, PLAUSIBLE_FLAGS, st.integers(0, 0xFFFF))
SMALL_INDEX = st.integers(0, 3)
INDEX = st.one_of(SMALL_INDEX, SMALL_INDEX, SMALL_INDEX, st.integers(0, 20))
DESCRIPTORS = st.tuples(ADDRESSES, LENGTHS, FLAGS, INDEX)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([4, 8, 16, 1, 2]),
    table=st.lists(DESCRIPTORS, min_size=16, max_size=16),
    indirect_tables=st.lists(st.lists(DESCRIPTORS, max_size=4), min_size=3, max_size=3),
    heads=st.lists(INDEX, min_size=16, max_size=16),
    pending=st.one_of(st.integers(0, 2), st.integers(0, 17), st.integers(0, 0xFFFF)),
    next_avail=st.integers(0, 0xFFFF),
    features=st.tuples(st.booleans(), st.booleans()),
)
def test_any_ring_yields_chains_inside_ram_or_virtqueue_error(
    size: int,
    table: list[tuple[int, int, int, int]],
    indirect_tables: list[list[tuple[int, int, int, int]]],
    heads: list[int],
    pending: int,
    next_avail: int,
    features: tuple[bool, bool],
) -> None:
    with guest_memory() as mem:
        for i, (addr, length, flags, next_index) in enumerate(table):
            put_desc(mem, DESC, i, addr, length, flags, next_index)
        for t, entries in enumerate(indirect_tables):
            for i, (addr, length, flags, next_index) in enumerate(entries):
                put_desc(mem, 0x20000 + 0x100 * t, i, addr, length, flags, next_index)
        for i, head in enumerate(heads):
            mem.write(AVAIL + 4 + 2 * ((next_avail + i) % size), struct.pack("<H", head))
        mem.write(AVAIL + 2, struct.pack("<H", (next_avail + pending) & 0xFFFF))
        queue = make_queue(mem, size, indirect=features[0], event_idx=features[1])
        queue.next_avail = queue.next_used = next_avail
        for _ in range(size + 1):
            try:
                chain = queue.pop()
            except VirtqueueError:
                return
            if chain is None:
                return
            buffers = chain.readable + chain.writable
            assert len(buffers) <= size + MAX_INDIRECT
            assert sum(b.length for b in buffers) <= MAX_CHAIN_BYTES
            for buf in buffers:
                mem.region_for(buf.gpa, buf.length)  # raises if outside RAM
            assert len(chain.read(0, 4096)) == min(chain.readable_len, 4096)
            chain.write(0, b"\xaa" * min(chain.writable_len, 64))
            queue.push(chain, chain.writable_len)
            queue.needs_interrupt()


BOUNDARY_ADDRESSES = st.sampled_from(
    [0, LOW[1] - 1, LOW[1], HIGH[0] - 1, HIGH[0], HIGH[0] + HIGH[1] - 1, 2**63, 2**64 - 1]
)
MUTATIONS = st.one_of(
    st.tuples(
        st.integers(0, 63), st.just(0), st.one_of(BOUNDARY_ADDRESSES, st.integers(0, 2**64 - 1))
    ),
    st.tuples(st.integers(0, 63), st.just(8), st.sampled_from([0, 1, 15, 17, 2**31, 2**32 - 1])),
    st.tuples(st.integers(0, 63), st.just(12), st.one_of(PLAUSIBLE_FLAGS, st.integers(0, 0xFFFF))),
    st.tuples(st.integers(0, 63), st.just(14), st.integers(0, 20)),
)
# A chain: buffers of (length, device-writable), laid out directly or through an indirect table.
CHAINS = st.lists(
    st.tuples(
        st.lists(st.tuples(st.integers(0, 300), st.booleans()), min_size=1, max_size=5),
        st.booleans(),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains=CHAINS, mutations=st.lists(MUTATIONS, max_size=3), next_avail=st.integers(0, 0xFFFF))
def test_valid_rings_round_trip_and_mutated_ones_fail_cleanly(
    chains: list[tuple[list[tuple[int, bool]], bool]],
    mutations: list[tuple[int, int, int]],
    next_avail: int,
) -> None:
    size = 32  # room for 4 direct chains of 5
    with guest_memory() as mem:
        queue = make_queue(mem, size)
        queue.next_avail = queue.next_used = next_avail
        slots: list[int] = []  # guest addresses of every descriptor written
        expected = []
        free, data = 0, 0x40000
        for n, (buffers, indirect) in enumerate(chains):
            buffers = sorted(buffers, key=lambda b: b[1])  # readable ones first
            head = free
            if indirect:
                table, first = 0x20000 + 0x400 * n, 0
                put_desc(mem, DESC, free, table, 16 * len(buffers), IND)
                slots.append(DESC + 16 * free)
                free += 1
            else:
                table, first = DESC, free
                free += len(buffers)
            chain = []
            for i, (length, writable) in enumerate(buffers):
                last = i + 1 == len(buffers)
                flags = (W if writable else 0) | (0 if last else N)
                put_desc(mem, table, first + i, data, length, flags, first + i + 1)
                slots.append(table + 16 * (first + i))
                chain.append((data, length, writable))
                data += length
            mem.write(AVAIL + 4 + 2 * ((next_avail + n) % size), struct.pack("<H", head))
            expected.append((head, chain))
        mem.write(AVAIL + 2, struct.pack("<H", (next_avail + len(chains)) & 0xFFFF))
        for target, offset, value in mutations:
            at = slots[target % len(slots)] + offset
            mem.write(at, value.to_bytes(8 if offset == 0 else 4 if offset == 8 else 2, "little"))

        got = []
        try:
            while (popped := queue.pop()) is not None:
                for buf in popped.readable + popped.writable:
                    mem.region_for(buf.gpa, buf.length)
                bufs = [(b.gpa, b.length, False) for b in popped.readable]
                got.append((popped.head, bufs + [(b.gpa, b.length, True) for b in popped.writable]))
                queue.push(popped, 0)
        except VirtqueueError:
            assert mutations, "a well-formed ring was refused"
            return
        if not mutations:
            assert got == expected


# MSI-X


@contextlib.contextmanager
def msix_table(vectors: int = 4) -> Iterator[tuple[Msix, FakeVm, FakeGsi, bytearray]]:
    vm, gsi = FakeVm(), FakeGsi()
    msix = Msix(vm, gsi, vectors, table=(2, 0x1000), pba=(2, 0x1800))  # type: ignore[arg-type]
    config = bytearray(256)
    msix.capability.attach(config, 0x40)
    config[0x42 : 0x40 + msix.capability.length] = msix.capability.body
    try:
        yield msix, vm, gsi, config
    finally:
        msix.close()


def set_control(msix: Msix, config: bytearray, control: int) -> None:
    config[0x42:0x44] = struct.pack("<H", control)
    msix.capability.after_write(2, 2)


def test_msix_capability_describes_table_and_pba() -> None:
    with msix_table(5) as (msix, _, _, _):
        body = msix.capability.body
        assert struct.unpack("<HII", body) == (4, 0x1000 | 2, 0x1800 | 2)
        assert msix.capability.cap_id == PCI_CAP_ID_MSIX
        assert msix.table_size == 80 and msix.pba_size == 8


def test_msix_vectors_start_masked_and_pend_until_unmasked() -> None:
    with msix_table() as (msix, vm, gsi, config):
        assert msix.table_read(12, 4) == 1  # vector 0 control: masked
        msix.table_write(0, 8, 0xFEE0_0000)
        msix.table_write(8, 4, 0x41)
        set_control(msix, config, 0x8000)  # enable
        assert vm.irqfds == {}  # still masked
        msix.signal(0)
        assert msix.pba_read(0, 8) == 1  # pending, nothing delivered
        msix.table_write(12, 4, 0)  # unmask: irqfd assigned; KVM would fire the pending event
        fd = msix.eventfds[0].fd
        assert vm.irqfds[fd] in gsi.routes
        assert gsi.routes[vm.irqfds[fd]] == (0xFEE0_0000, 0x41)
        assert vm.fired_on_assign == [vm.irqfds[fd]]
        assert msix.pba_read(0, 8) == 0 and not readable(fd)
        msix.table_write(12, 4, 1)  # masked again: nothing pending, it was delivered
        assert msix.pba_read(0, 8) == 0


def test_msix_function_mask_and_disable_detach_every_vector() -> None:
    with msix_table() as (msix, vm, _, config):
        for v in range(4):
            msix.table_write(16 * v + 12, 4, 0)
        set_control(msix, config, 0x8000)
        assert len(vm.irqfds) == 4
        set_control(msix, config, 0xC000)  # function mask
        assert vm.irqfds == {}
        msix.signal(2)
        assert msix.pba_read(0, 4) == 0b100
        set_control(msix, config, 0x8000)
        assert len(vm.irqfds) == 4
        set_control(msix, config, 0)
        assert vm.irqfds == {}


def test_msix_route_follows_address_and_data_writes() -> None:
    with msix_table() as (msix, vm, gsi, config):
        set_control(msix, config, 0x8000)
        msix.table_write(16, 4, 0xFEE0_1000)
        msix.table_write(28, 4, 0)
        route = vm.irqfds[msix.eventfds[1].fd]
        msix.table_write(24, 4, 0x77)  # data changed while live (sloppy, but allowed)
        assert gsi.routes[route] == (0xFEE0_1000, 0x77)
        msix.table_write(16, 8, 0x1_FEE0_2000)  # one 64-bit write of both address halves
        assert gsi.routes[route] == (0x1_FEE0_2000, 0x77)


def test_msix_route_refused_by_kvm_leaves_no_interrupt_and_no_poisoned_table() -> None:
    with msix_table() as (msix, vm, gsi, config):
        gsi.refuse = lambda address, data: data == 0xBAD
        set_control(msix, config, 0x8000)
        msix.table_write(8, 4, 0xBAD)
        msix.table_write(12, 4, 0)
        assert vm.irqfds == {} and gsi.routes == {}
        msix.table_write(16 + 8, 4, 0x42)
        msix.table_write(16 + 12, 4, 0)  # another vector still works
        assert list(gsi.routes.values()) == [(0, 0x42)]
        msix.table_write(8, 4, 0x43)  # and the first one recovers with a good message
        assert sorted(gsi.routes.values()) == [(0, 0x42), (0, 0x43)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.just("table"),
                st.integers(-8, 80),
                st.sampled_from([1, 2, 4, 8]),
                st.integers(0, 2**64 - 1),
            ),
            st.tuples(st.just("control"), st.just(0), st.just(2), st.integers(0, 0xFFFF)),
            st.tuples(st.just("pba"), st.integers(-8, 16), st.sampled_from([1, 4, 8]), st.just(0)),
            st.tuples(st.just("signal"), st.integers(-1, 5), st.just(0), st.just(0)),
        ),
        max_size=40,
    )
)
def test_msix_survives_any_guest_traffic(ops: list[tuple[str, int, int, int]]) -> None:
    with msix_table() as (msix, vm, gsi, config):
        gsi.refuse = lambda address, data: data & 0xFF == 0xFF
        for kind, offset, size, value in ops:
            if kind == "table":
                msix.table_write(offset, size, value & ((1 << (8 * size)) - 1))
                msix.table_read(offset, size)
            elif kind == "control":
                set_control(msix, config, value)
            elif kind == "pba":
                msix.pba_read(offset, size)
            else:
                msix.signal(offset)
        state = msix.save()
        for v in range(msix.vectors):
            ctrl = msix.table_read(16 * v + 12, 4)
            assert ctrl in (0, 1)  # reserved bits stay zero
            live = state.enabled and not state.masked and not ctrl
            fd = msix.eventfds[v].fd
            data = msix.table_read(16 * v + 8, 4)
            assert (fd in vm.irqfds) == (live and data & 0xFF != 0xFF)


def test_msix_state_round_trip_keeps_pending_vectors() -> None:
    with msix_table() as (msix, _, _, config):
        msix.table_write(16, 4, 0xFEE0_0000)
        msix.table_write(24, 4, 0x33)
        set_control(msix, config, 0x8000)
        msix.signal(1)
        saved = msix.save()
        assert saved.pending == [1] and saved.enabled
        with msix_table() as (other, vm, gsi, _):
            other.restore(saved)
            assert other.save() == saved
            other.table_write(28, 4, 0)
            assert gsi.routes[vm.irqfds[other.eventfds[1].fd]] == (0xFEE0_0000, 0x33)


# the virtio-pci transport, driven through its registers


def caps_by_type(device: vpci.VirtioPciDevice) -> dict[int, dict[str, int]]:
    """Walks the capability list the way a driver does."""
    found: dict[int, dict[str, int]] = {}
    assert device.config_read(0x06, 2) & 0x10
    pos = device.config_read(0x34, 1)
    hops = 0
    while pos:
        hops += 1
        assert hops < 48 and pos % 4 == 0 and pos >= 0x40
        if device.config_read(pos, 1) == PCI_CAP_ID_VNDR:
            cap_len, cfg_type, bar = (device.config_read(pos + i, 1) for i in (2, 3, 4))
            found[cfg_type] = {
                "pos": pos,
                "len": cap_len,
                "bar": bar,
                "offset": device.config_read(pos + 8, 4),
                "length": device.config_read(pos + 12, 4),
            }
            if cfg_type == pci_layout.VIRTIO_PCI_CAP_NOTIFY_CFG:
                found[cfg_type]["multiplier"] = device.config_read(pos + 16, 4)
        pos = device.config_read(pos + 1, 1)
    return found


def test_virtio_pci_identity_and_capabilities() -> None:
    with virtio_device() as (_, device, _):
        assert device.config_read(0, 4) == 0x1044_1AF4  # virtio-rng, modern
        assert device.config_read(0x08, 1) >= 1  # revision: non-transitional
        assert device.config_read(0x2E, 2) >= 0x40
        caps = caps_by_type(device)
        common = caps[pci_layout.VIRTIO_PCI_CAP_COMMON_CFG]
        assert (common["bar"], common["offset"], common["length"]) == (0, 0, 0x3C)
        notify = caps[pci_layout.VIRTIO_PCI_CAP_NOTIFY_CFG]
        assert notify["len"] == 20 and notify["multiplier"] == 4
        assert caps[pci_layout.VIRTIO_PCI_CAP_ISR_CFG]["length"] >= 1
        assert pci_layout.VIRTIO_PCI_CAP_DEVICE_CFG not in caps  # virtio-rng has no config
        assert caps[pci_layout.VIRTIO_PCI_CAP_PCI_CFG]["len"] == 20
        assert device.capabilities.find(PCI_CAP_ID_MSIX) is device.msix.capability
        # the capabilities are read-only to the guest
        before = bytes(device.config[0x40:0x100])
        for offset in range(0x40, 0x100, 4):
            device.config_write(offset, 4, 0xFFFF_FFFF)
        pci_cfg = caps[pci_layout.VIRTIO_PCI_CAP_PCI_CFG]["pos"]
        msix_cap = device.msix.capability.offset
        for offset in range(0x40, 0x100):
            if pci_cfg + 4 <= offset < pci_cfg + 20 or msix_cap + 2 <= offset < msix_cap + 4:
                continue  # the PCI-config window and MSI-X control are writable
            assert device.config[offset] == before[offset - 0x40], hex(offset)


def test_feature_negotiation_requires_version_1() -> None:
    with virtio_device() as (_, _, driver):
        driver.write("device_feature_select", 1)
        assert driver.read("device_feature") & 1  # VERSION_1 is bit 32
        assert not driver.negotiate(0)
        assert not driver.negotiate(VIRTIO_F_VERSION_1 | 1 << 40)  # not offered
        assert driver.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
        driver.write("driver_feature_select", 0)
        driver.write("driver_feature", 0)  # too late: FEATURES_OK is set
        assert driver.read("driver_feature") == VIRTIO_F_EVENT_IDX & 0xFFFFFFFF


def test_rng_request_is_processed_by_the_worker_and_raises_its_vector() -> None:
    with virtio_device() as (machine, device, driver):
        driver.start(0)
        doorbell = device.bar_address(0) + pci_layout.NOTIFY_OFFSET
        queue_fd = machine.vm.ioeventfds[(doorbell, 2)]
        vector_fd = device.msix.eventfds[0].fd
        assert vector_fd in machine.vm.irqfds
        head = driver.post(0, [(0x200000, 32, True)])
        os.eventfd_write(queue_fd, 1)  # what KVM does on the guest's doorbell write
        assert driver.wait_used(0, 1) == [(head, 32)]
        assert machine.memory.read(0x200000, 32) != bytes(32)
        deadline = time.monotonic() + 5
        while not readable(vector_fd):  # the irqfd would have injected vector 0x40
            assert time.monotonic() < deadline
            time.sleep(0.002)
        # The Python fallback path (a doorbell write KVM did not catch) works too.
        driver.post(0, [(0x200100, 8, True)])
        driver.notify(0)
        assert len(driver.wait_used(0, 2)) == 2


def test_nothing_is_processed_before_driver_ok_or_without_bus_mastering() -> None:
    with virtio_device() as (_, device, driver):
        assert driver.negotiate()
        driver.setup_queue(0)
        driver.post(0, [(0x200000, 8, True)])
        driver.notify(0)
        time.sleep(0.05)
        assert driver.used(0) == []
        command = device.config_read(PCI_COMMAND, 2)
        device.config_write(PCI_COMMAND, 2, command & ~PCI_COMMAND_MASTER)
        driver.write("device_status", pci_common.STATUS_DRIVER_OK)
        time.sleep(0.05)
        assert driver.used(0) == []
        device.config_write(PCI_COMMAND, 2, command | PCI_COMMAND_MASTER)  # kicks the queue
        assert len(driver.wait_used(0, 1)) == 1


def test_queue_registers_and_reset() -> None:
    with virtio_device() as (machine, _, driver):
        assert driver.read("num_queues") == 1
        driver.write("queue_select", 0)
        assert driver.read("queue_size") == 256
        assert driver.read("queue_notify_off") == 0
        driver.write("queue_msix_vector", 7)  # no such table entry
        assert driver.read("queue_msix_vector") == vpci.NO_VECTOR
        driver.write("queue_select", 5)
        assert driver.read("queue_size") == 0  # no such queue
        driver.write("queue_enable", 1)
        driver.start(0)
        desc = driver.rings(0)[0]
        driver.write("queue_select", 0)
        assert driver.read("queue_enable") == 1
        assert driver.read("queue_desc") == desc
        driver.write("queue_desc", 0x1234)  # fixed once enabled
        assert driver.read("queue_desc") == desc
        assert len(machine.vm.ioeventfds) == 1
        driver.write("device_status", 0)
        assert driver.read("device_status") == 0
        assert driver.read("queue_enable") == 0
        assert machine.vm.ioeventfds == {}


def test_doorbell_follows_the_bar() -> None:
    with virtio_device() as (machine, device, driver):
        driver.start(0)
        old = device.bar_address(0)
        assert (old + pci_layout.NOTIFY_OFFSET, 2) in machine.vm.ioeventfds
        device.config_write(PCI_BASE_ADDRESS_0, 4, 0xD000_0004)
        assert list(machine.vm.ioeventfds) == [(0xD000_0000 + pci_layout.NOTIFY_OFFSET, 2)]
        command = device.config_read(PCI_COMMAND, 2)
        device.config_write(PCI_COMMAND, 2, command & ~2)  # memory decode off
        assert machine.vm.ioeventfds == {}
        device.config_write(PCI_COMMAND, 2, command)
        assert len(machine.vm.ioeventfds) == 1


def test_bad_ring_sets_needs_reset_and_stops_that_queue_only_until_reset() -> None:
    with virtio_device() as (_, device, driver):
        driver.start(0)
        desc = driver.rings(0)[0]
        put_desc(driver.mem, desc, 0, 0x10000, 1, N, 0)  # a loop
        driver.publish(0, 0)
        driver.notify(0)
        driver.wait_status(pci_common.STATUS_DEVICE_NEEDS_RESET)
        assert readable(device.msix.eventfds[1].fd) is False  # config vector: none set
        assert device.bar_read(0, pci_layout.ISR_OFFSET, 1) == vpci.ISR_CONFIG
        assert device.bar_read(0, pci_layout.ISR_OFFSET, 1) == 0  # read to clear
        driver.publish(0, 1)
        driver.notify(0)
        time.sleep(0.05)
        assert driver.used(0) == []
        driver.start(0)  # reset and set up again: works
        driver.post(0, [(0x200000, 8, True)])
        driver.notify(0)
        assert len(driver.wait_used(0, 1)) == 1


def test_pci_cfg_capability_reaches_the_common_config() -> None:
    with virtio_device() as (_, device, _):
        pos = caps_by_type(device)[pci_layout.VIRTIO_PCI_CAP_PCI_CFG]["pos"]
        device.config_write(pos + 4, 1, 0)  # BAR 0
        device.config_write(pos + 8, 4, 0x12)  # num_queues
        device.config_write(pos + 12, 4, 2)
        assert device.config_read(pos + 16, 2) == 1
        device.config_write(pos + 8, 4, 0x16)  # queue_select, written through the window
        device.config_write(pos + 16, 2, 3)
        assert device.common.queue_select == 3
        device.config_write(pos + 12, 4, 3)  # bad length: no access
        assert device.config_read(pos + 16, 4) == 3


def test_transport_state_round_trip() -> None:
    with virtio_device() as (_, device, driver):
        driver.start(0)
        driver.post(0, [(0x200000, 8, True)])
        driver.notify(0)
        driver.wait_used(0, 1)
        saved = device.save()
        with virtio_device() as (machine2, other, driver2):
            machine2.memory.write(0, driver.mem.read(0, 4 * MiB))
            other.restore(saved)
            assert other.save() == saved
            assert len(machine2.vm.ioeventfds) == 1
            assert other.msix.eventfds[0].fd in machine2.vm.irqfds
            driver2.avail[0], driver2.free[0], driver2.sizes[0] = 1, 1, 8
            driver2.post(0, [(0x200000, 8, True)])
            driver2.notify(0)
            assert len(driver2.wait_used(0, 2)) == 2


REGISTERS = st.one_of(
    st.tuples(
        st.just("bar"),
        st.integers(0, pci_layout.BAR_SIZE),
        st.sampled_from([1, 2, 4, 8]),
        st.integers(0, 2**64 - 1),
    ),
    st.tuples(
        st.just("common"),
        st.integers(0, 0x3C),
        st.sampled_from([1, 2, 4, 8]),
        st.integers(0, 2**64 - 1),
    ),
    st.tuples(
        st.just("config"),
        st.integers(0, 0x100),
        st.sampled_from([1, 2, 4]),
        st.integers(0, 2**32 - 1),
    ),
    st.tuples(
        st.just("ram"), st.integers(0x100000, 0x130000), st.just(8), st.integers(0, 2**64 - 1)
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(REGISTERS, max_size=60))
def test_transport_survives_any_guest_traffic(ops: list[tuple[str, int, int, int]]) -> None:
    """Random register writes (and random bytes in the rings) on a live device: nothing raises,
    the worker stays up, and after a reset the device works."""
    with virtio_device() as (_, device, driver):
        driver.start(0)
        for kind, offset, size, value in ops:
            value &= (1 << (8 * size)) - 1
            if kind == "ram":
                driver.mem.write(offset, value.to_bytes(8, "little"))
                driver.notify(0)
            elif kind == "config":
                device.config_write(offset, size, value)
                device.config_read(offset, size)
            else:
                device.bar_write(0, offset, size, value)
                device.bar_read(0, offset, size)
        assert device._worker.is_alive()
        device.config_write(PCI_COMMAND, 2, 0x6)
        device.config_write(PCI_BASE_ADDRESS_0, 4, 0xC000_0004)
        device.config_write(PCI_BASE_ADDRESS_0 + 4, 4, 0)
        driver.start(0)
        driver.post(0, [(0x200000, 8, True)])
        driver.notify(0)
        assert driver.wait_used(0, 1)[-1][1] == 8
