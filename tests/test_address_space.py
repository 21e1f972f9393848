"""The address space against a recording slot table (real KVM slots are tested in
test_machine_layer.py): slot numbers, overlaps, moves, listeners, and the listeners pyvmm has —
DMA mapping of guest RAM for assigned devices and the dirty log of pyvmm's own writes."""

from __future__ import annotations

import ctypes
import itertools
import os
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from fakes import RecordingDma, RecordingSlots
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio.queue import VIRTQ_DESC_F_WRITE, Virtqueue
from pyvmm.kvm.mmap import PAGE_SIZE, Mapping
from pyvmm.machine.address_space import AddressSpace, AddressSpaceError
from pyvmm.machine.dirty import DirtyBitmap, DirtyLog
from pyvmm.machine.dma import IdentityDma
from pyvmm.machine.memory import (
    GuestMemory,
    GuestMemoryError,
    MemoryRegion,
    RamRegion,
    RegionKind,
)
from pyvmm.uapi import kvm as uapi
from pyvmm.vfio.context import HostDevice, VfioContext
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.dma_space import GuestRamMapper
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.sysfs import PciDevice

MiB = 1 << 20
PAGE = 4096


@pytest.fixture
def space() -> Iterator[tuple[AddressSpace, RecordingSlots]]:
    slots = RecordingSlots()
    space = AddressSpace(slots, 8)
    space.add(RamRegion(0, 4 * MiB, name="low"))
    space.add(RamRegion(1 << 32, 2 * MiB, name="high"))
    yield space, slots
    space.memory.close()


@pytest.fixture
def bar() -> Iterator[Mapping]:
    with Mapping(4 * PAGE) as mapping:
        yield mapping


def device(mapping: Mapping, gpa: int) -> MemoryRegion:
    return MemoryRegion(RegionKind.DEVICE, gpa, mapping.size, host_addr=mapping.addr, name="bar")


def test_slots_are_allocated_lowest_first_and_reused(space, bar: Mapping) -> None:
    space, slots = space
    assert sorted(slots.slots) == [0, 1]
    first = device(bar, 0xC000_0000)
    space.add(first)
    assert first.slot == 2 and slots.slots[2] == (0xC000_0000, 4 * PAGE, bar.addr, 0)
    space.add(MemoryRegion(RegionKind.RESERVED, 0xFEC0_0000, PAGE, name="ioapic"))
    assert sorted(slots.slots) == [0, 1, 2]  # a reserved range has no slot
    space.remove(first)
    assert first.slot is None and 2 not in slots.slots
    second = device(bar, 0xD000_0000)
    space.add(second)
    assert second.slot == 2


def test_overlaps_are_refused_reserved_ranges_included(space, bar: Mapping) -> None:
    space, slots = space
    space.add(MemoryRegion(RegionKind.RESERVED, 0xFEE0_0000, PAGE, name="lapic"))
    before = dict(slots.slots)
    with pytest.raises(AddressSpaceError, match="overlaps ram region low"):
        space.add(device(bar, 3 * MiB))
    with pytest.raises(AddressSpaceError, match="overlaps reserved region lapic"):
        space.add(device(bar, 0xFEDF_E000))
    assert slots.slots == before


def test_running_out_of_slots_is_an_error() -> None:
    space = AddressSpace(RecordingSlots(), 1)
    space.add(RamRegion(0, MiB))
    with pytest.raises(AddressSpaceError, match="no KVM memory slot left"):
        space.add(RamRegion(2 * MiB, MiB))
    space.memory.close()


def test_a_device_region_moves_with_its_slot(space, bar: Mapping) -> None:
    space, slots = space
    region = device(bar, 0xC000_0000)
    space.add(region)
    slot = region.slot
    space.move(region, 0xD000_0000)
    assert region.slot == slot and slots.slots[slot][0] == 0xD000_0000
    assert space.find(0xD000_1000) is region and space.find(0xC000_1000) is None
    with pytest.raises(AddressSpaceError, match="overlaps"):
        space.move(region, 2 * MiB)
    assert region.gpa == 0xD000_0000
    with pytest.raises(AddressSpaceError, match="only device memory moves"):
        space.move(space.regions(RegionKind.RAM)[0], 0x1000_0000)


def test_guest_ram_is_dma_mapped_at_its_physical_addresses_and_nothing_else(
    space, bar: Mapping
) -> None:
    space, _ = space
    dma = RecordingDma(((0, (1 << 48) - 1),))
    space.listen(GuestRamMapper(dma))
    assert dma.mapped == {r.gpa: (r.host_addr, r.size) for r in space.regions(RegionKind.RAM)}
    region = device(bar, 0xC000_0000)
    space.add(region)
    space.move(region, 0xD000_0000)
    assert set(dma.mapped) == {0, 1 << 32}  # device memory is never DMA-mapped
    late = RamRegion(8 * MiB, MiB)
    space.add(late)
    assert dma.mapped[8 * MiB] == (late.host_addr, MiB)  # the mapping follows the map
    space.remove(late)
    late.close()
    assert 8 * MiB not in dma.mapped


def test_ram_outside_the_usable_iovas_is_refused_and_nothing_stays_mapped(space) -> None:
    space, _ = space
    dma = RecordingDma(((0, 0xFEDFFFFF),))  # the high region is beyond it
    mapper = GuestRamMapper(dma)
    with pytest.raises(VfioError, match=r"guest RAM 0x100000000-0x1001fffff is outside"):
        space.listen(mapper)
    assert dma.mapped == {}
    space.add(RamRegion(8 * MiB, MiB))  # the refused listener does not follow the map
    assert dma.mapped == {}


def test_a_failed_map_undoes_the_earlier_ones(space) -> None:
    space, _ = space
    dma = RecordingDma((), fail_at=1 << 32)  # no ranges reported: nothing is known
    with pytest.raises(VfioError, match="no more mappings"):
        space.listen(GuestRamMapper(dma))
    assert dma.mapped == {}


def test_a_listener_refusing_a_region_undoes_the_add(space, bar: Mapping) -> None:
    space, slots = space
    dma = RecordingDma(((0, 0xFFFF_FFFF), (1 << 32, (1 << 33) - 1)))
    space.listen(GuestRamMapper(dma))
    before = dict(slots.slots)
    with pytest.raises(VfioError, match="outside the IOVA ranges"):
        space.add(RamRegion(1 << 40, MiB))
    assert slots.slots == before and len(space.regions(RegionKind.RAM)) == 2


def test_unlisten_unmaps_everything(space) -> None:
    space, _ = space
    dma = RecordingDma()
    mapper = GuestRamMapper(dma)
    space.listen(mapper)
    space.unlisten(mapper)
    assert dma.mapped == {}


def test_dirty_log_merges_kvm_and_pyvmm_writes_in_bitmaps(space, bar: Mapping) -> None:
    space, slots = space
    log = DirtyLog(space)
    space.add(device(bar, 0xC000_0000))
    with pytest.raises(RuntimeError, match="dirty logging is off"):
        log.collect()
    space.memory.write(0x5000, b"before logging")  # not tracked
    log.start()
    low, high = space.regions(RegionKind.RAM)
    assert all(slots.slots[r.slot][3] & uapi.KVM_MEM_LOG_DIRTY_PAGES for r in (low, high))
    device_slot = next(r for r in space.regions(RegionKind.DEVICE)).slot
    assert not slots.slots[device_slot][3] & uapi.KVM_MEM_LOG_DIRTY_PAGES
    slots.dirty[low.slot] = {3, 7}  # what the vCPUs wrote
    space.memory.write(0x7FFE, b"span")  # pyvmm: pages 7 and 8
    space.memory.writable((1 << 32) + PAGE, 1)[0] = 1
    low_map, high_map = log.collect()
    assert list(low_map.addresses("kvm")) == [3 * PAGE, 7 * PAGE]
    assert list(low_map.addresses("vmm")) == [7 * PAGE, 8 * PAGE]
    assert list(low_map.addresses()) == [3 * PAGE, 7 * PAGE, 8 * PAGE]
    assert low_map.ranges() == [(3 * PAGE, PAGE), (7 * PAGE, 2 * PAGE)]
    assert low_map.count() == 3 and 8 * PAGE in low_map and 9 * PAGE not in low_map
    assert list(high_map.addresses("vmm")) == [(1 << 32) + PAGE]
    assert len(low_map.bitmap) == (4 * MiB // PAGE) // 8
    assert [b.count() for b in log.collect()] == [0, 0]  # read and cleared
    late = RamRegion(16 * MiB, 2 * PAGE)
    space.add(late)
    assert [b.count() for b in log.collect()] == [0, 2, 0]  # never collected: all dirty
    log.stop()
    assert not any(flags & uapi.KVM_MEM_LOG_DIRTY_PAGES for *_, flags in slots.slots.values())
    space.memory.write(0x9000, b"after")
    assert space.memory.on_write is None


@dataclass(frozen=True)
class Reported:
    gpa: int
    pages: int
    bitmap: bytes


class FakeDmaSource:
    """A device's DMA dirty tracking as a source of the log: the pages in `written` (guest
    addresses) are reported over the ranges it tracks ({gpa: pages}), then cleared."""

    def __init__(self, tracked: dict[int, int], refuse: str = "") -> None:
        self.tracked = tracked
        self.refuse = refuse
        self.written: set[int] = set()
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")
        if self.refuse:
            raise VfioError(self.refuse)

    def collect(self) -> list[Reported]:
        found = []
        for gpa, pages in self.tracked.items():
            bits = sum(
                1 << (a - gpa) // PAGE for a in self.written if gpa <= a < gpa + pages * PAGE
            )
            found.append(Reported(gpa, pages, bits.to_bytes((pages + 7) // 8, "little")))
        self.written.clear()
        return found

    def stop(self) -> None:
        self.calls.append("stop")


def test_a_dirty_source_is_merged_into_the_regions_it_overlaps(space) -> None:
    """A device's DMA, reported by a source over ranges of its own (IOVA = GPA, not the RAM
    regions' bounds), is in the collect of each region it falls in, beside KVM's and pyvmm's."""
    space, slots = space
    log = DirtyLog(space)
    source = FakeDmaSource({2 * MiB: 512, 1 << 32: 16})  # half of low, part of high
    log.add_source(source)
    assert source.calls == []  # started with the log
    log.start()
    assert source.calls == ["start"]
    low, _ = space.regions(RegionKind.RAM)
    slots.dirty[low.slot] = {1}
    source.written |= {2 * MiB, 2 * MiB + 5 * PAGE, 4 * MiB - PAGE, (1 << 32) + 15 * PAGE}
    low_map, high_map = log.collect()
    assert list(low_map.addresses("dma")) == [2 * MiB, 2 * MiB + 5 * PAGE, 4 * MiB - PAGE]
    assert list(low_map.addresses()) == [PAGE, 2 * MiB, 2 * MiB + 5 * PAGE, 4 * MiB - PAGE]
    assert list(high_map.addresses("dma")) == [(1 << 32) + 15 * PAGE]
    assert (low_map | DirtyBitmap(low.gpa, low_map.pages, b"", b"")).dma == low_map.dma
    assert [b.count() for b in log.collect()] == [0, 0]  # the source's read clears it
    log.stop()
    assert source.calls == ["start", "stop"]
    log.remove_source(source)
    log.start()
    log.stop()
    assert source.calls == ["start", "stop"]  # removed: no longer started


def test_a_source_that_cannot_track_leaves_nothing_logging(space) -> None:
    space, slots = space
    log = DirtyLog(space)
    tracking = FakeDmaSource({0: 16})
    log.add_source(tracking)
    log.add_source(FakeDmaSource({0: 16}, refuse="its IOMMU cannot track dirty pages"))
    with pytest.raises(VfioError, match="cannot track dirty pages"):
        log.start()
    assert not log.active and space.memory.on_write is None
    assert not any(flags & uapi.KVM_MEM_LOG_DIRTY_PAGES for *_, flags in slots.slots.values())
    assert tracking.calls == ["start", "stop"]  # the one started was stopped
    log.remove_source(log._sources[-1])
    log.start()
    late = FakeDmaSource({0: 16}, refuse="no")
    with pytest.raises(VfioError):
        log.add_source(late)  # the log is on: started now, and refused
    assert log.active and late not in log._sources
    log.stop()


class StuckSource(FakeDmaSource):
    """A source whose stop fails (its device would not go back to its page table)."""

    def stop(self) -> None:
        super().stop()
        raise VfioError("stuck")


def test_sources_stop_once_each_and_what_a_leaving_one_found_is_kept(space) -> None:
    space, _ = space
    log = DirtyLog(space)
    first, second = StuckSource({0: 16}), FakeDmaSource({0: 16})
    log.add_source(first)
    log.stop()  # never started: nothing to stop
    assert first.calls == []
    log.start()
    log.add_source(second)  # the log is on: started now
    second.written.add(3 * PAGE)
    log.remove_source(second)  # its last pages stay in the log
    assert second.calls == ["start", "stop"]
    (low, _) = log.collect()
    assert 3 * PAGE in low
    third = FakeDmaSource({0: 16})
    log.add_source(third)
    with pytest.raises(VfioError, match="stuck"):
        log.stop()
    assert third.calls == ["start", "stop"] and not log.active  # one failing strands none
    log.stop()
    assert third.calls == ["start", "stop"]  # stopped once


@given(st.integers(1, 3000), st.integers(0, 2**3000 - 1), st.integers(0, 2**3000 - 1))
def test_dirty_ranges_are_the_runs_of_dirty_pages(pages: int, kvm: int, vmm: int) -> None:
    kvm, vmm = kvm >> (3000 - pages), vmm >> (3000 - pages)  # (any pattern, down to one page)
    size = (pages + 7) // 8
    bitmap = DirtyBitmap(1 << 32, pages, kvm.to_bytes(size, "little"), vmm.to_bytes(size, "little"))
    runs = bitmap.ranges()
    covered = [gpa + at for gpa, length in runs for at in range(0, length, PAGE)]
    assert covered == list(bitmap.addresses())
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(runs))  # maximal


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4 * MiB - 1), st.integers(1, 3 * PAGE)), max_size=20))
def test_every_byte_pyvmm_writes_is_in_a_dirty_page(writes: list[tuple[int, int]]) -> None:
    slots = RecordingSlots()
    space = AddressSpace(slots, 4)
    space.add(RamRegion(0, 4 * MiB))
    try:
        log = DirtyLog(space)
        log.start()
        expected: set[int] = set()
        for gpa, length in writes:
            length = min(length, 4 * MiB - gpa)
            space.memory.write(gpa, bytes(length))
            expected |= {page * PAGE for page in range(gpa // PAGE, (gpa + length - 1) // PAGE + 1)}
        (bitmap,) = log.collect()
        assert set(bitmap.addresses()) == expected
        assert set(bitmap.addresses("kvm")) == set()
    finally:
        space.memory.close()


def test_a_device_write_spanning_a_collect_is_reported_again_when_the_chain_is_pushed(
    space,
) -> None:
    """The device takes a view to write into (marked then), the dirty log is read and cleared,
    then the write lands: pushing the chain marks the page again, so the next read has it."""
    space, _ = space
    log = DirtyLog(space)
    log.start()
    memory = space.memory
    queue = Virtqueue(IdentityDma(memory), 8)
    queue.size, queue.desc, queue.driver, queue.device = 8, 0x10000, 0x11000, 0x12000
    queue.activate()
    memory.write(0x10000, struct.pack("<QIHH", 0x30000, 64, VIRTQ_DESC_F_WRITE, 0))
    memory.write(0x11000 + 4, struct.pack("<H", 0))
    memory.write(0x11000 + 2, struct.pack("<H", 1))
    chain = queue.pop()
    assert chain is not None
    (view,) = chain.writable_views()
    log.collect()  # a migration round reads the log here
    view[:5] = b"later"
    queue.push(chain, 5)
    dirty = {a for b in log.collect() for a in b.addresses("vmm")}
    assert 0x30000 in dirty and 0x12000 in dirty  # the buffer and the used ring


class FailingSlots(RecordingSlots):
    def __init__(self) -> None:
        super().__init__()
        self.refuse_gpa: int | None = None

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        if gpa == self.refuse_gpa and size:
            raise OSError(22, "KVM said no")
        super().set_user_memory_region(slot, gpa, size, host_addr, flags)


class Told:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def region_added(self, region: MemoryRegion) -> None:
        self.events.append(("added", region.gpa))

    def region_removed(self, region: MemoryRegion) -> None:
        self.events.append(("removed", region.gpa))


def test_a_move_kvm_refuses_leaves_the_region_where_it_was(bar: Mapping) -> None:
    slots = FailingSlots()
    space = AddressSpace(slots, 4)
    region = device(bar, 0xC000_0000)
    space.add(region)
    told = Told()
    space.listen(told)
    slots.refuse_gpa = 0xD000_0000
    with pytest.raises(OSError, match="KVM said no"):
        space.move(region, 0xD000_0000)
    assert region.gpa == 0xC000_0000 and slots.slots[region.slot][0] == 0xC000_0000
    assert space.find(0xC000_0000) is region
    assert told.events == [("added", 0xC000_0000), ("removed", 0xC000_0000), ("added", 0xC000_0000)]


def test_a_listener_failing_on_removal_does_not_keep_the_others_from_hearing(bar: Mapping) -> None:
    class Grumpy(Told):
        def region_removed(self, region: MemoryRegion) -> None:
            raise RuntimeError("no")

    space = AddressSpace(RecordingSlots(), 4)
    region = device(bar, 0xC000_0000)
    space.add(region)
    first, grumpy = Told(), Grumpy()
    space.listen(first)
    space.listen(grumpy)
    with pytest.raises(RuntimeError, match="no"):
        space.remove(region)
    assert first.events[-1] == ("removed", 0xC000_0000)
    assert space.regions() == [] and region.slot is None


class HalfwayContext(VfioContext):
    """A backend whose device opens fine but whose DMA space refuses guest RAM."""

    backend = "test"

    def __init__(self, address_space: AddressSpace) -> None:
        super().__init__(None, address_space)
        self.space = RecordingDma(((0, 0xFFFF),))  # far too small for the RAM
        self.closed: list[str] = []

    @property
    def dma(self) -> RecordingDma:
        return self.space

    def _open(self, device: HostDevice, stack: ExitStack) -> VfioDevice:
        stack.callback(self.closed.append, device.name)
        return cast(VfioDevice, object())


def test_a_device_whose_context_cannot_map_guest_ram_leaves_nothing_behind(space) -> None:
    space, _ = space
    context = HalfwayContext(space)
    device_info = PciDevice("0000:00:04.0", 0x1234, 0x11E8, 0, "vfio-pci", "5", True, None, False)
    with pytest.raises(VfioError, match="outside the IOVA ranges the IOMMU allows"):
        context.open_pci(device_info)
    assert context.closed == ["0000:00:04.0"] and context.devices == {}
    assert context.space.mapped == {}
    space.add(RamRegion(8 * MiB, MiB))  # the context does not follow the map
    assert context.space.mapped == {}
    context.close()


class RecordingFileDma(RecordingDma):
    def __init__(self, supported: bool) -> None:
        super().__init__()
        self.supported = supported
        self.files: dict[int, tuple[int, int, int]] = {}

    def map_file(self, iova: int, fd: int, offset: int, size: int) -> bool:
        if self.supported:
            self.files[iova] = (fd, offset, size)
        return self.supported


@pytest.mark.parametrize("supported", [True, False])
def test_ram_is_mapped_by_its_memfd_where_the_space_can(space, supported: bool) -> None:
    space, _ = space
    dma = RecordingFileDma(supported)
    space.listen(GuestRamMapper(dma))
    ram = space.regions(RegionKind.RAM)
    if supported:
        assert dma.files == {r.gpa: (r.fd, 0, r.size) for r in ram} and dma.mapped == {}
    else:  # an older kernel: the mapping's address instead
        assert dma.files == {} and dma.mapped == {r.gpa: (r.host_addr, r.size) for r in ram}


def test_privately_mapped_ram_is_mapped_by_address_never_by_its_file(space, tmp_path: Path) -> None:
    """RAM restored from a snapshot maps the memory file privately: the guest's pages are this
    process's copies, so DMA must see them, not the file's pages."""
    space, _ = space
    dma = RecordingFileDma(True)
    space.listen(GuestRamMapper(dma))
    before = dict(dma.files)
    image = tmp_path / "memory"
    image.write_bytes(bytes(2 * MiB))
    fd = os.open(image, os.O_RDONLY)
    try:
        region = RamRegion(64 * MiB, 2 * MiB, "restored", fd=fd, offset=MiB, private=True)
    finally:
        os.close(fd)
    space.add(region)
    assert dma.files == before
    assert dma.mapped[64 * MiB] == (region.host_addr, 2 * MiB)
    region.view[0] = 1  # a private page: the file keeps its zeros
    assert image.read_bytes()[MiB] == 0


def mapped_kib(region: RamRegion) -> int:
    """How much of `region`'s mapping is in this process's page tables (smaps' Rss)."""
    start = f"{region.host_addr:x}-"
    lines = Path("/proc/self/smaps").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(start))
    rss = next(line for line in lines[at + 1 :] if line.startswith("Rss:"))
    return int(rss.split()[1])


@pytest.mark.parametrize("populate", [False, True])
def test_written_pages_are_in_the_mapping_when_populated(populate: bool) -> None:
    """A migration's long runs are written through the file and faulted into the mapping at
    once, so that the guest's first touch after the switch-over takes no host page fault."""
    memory = GuestMemory()
    region = RamRegion(0, 4 * MiB)
    memory.add(region)
    try:
        memory.write_pages(MiB, b"\x5a" * MiB, populate=populate)
        assert mapped_kib(region) == (MiB >> 10 if populate else 0)
        assert memory.read(MiB, 4) == b"\x5a" * 4 and memory.read(2 * MiB - 1, 1) == b"\x5a"
    finally:
        region.close()


def test_copy_out_copies_one_regions_bytes_after_making_them_present() -> None:
    """What a migration sends is copied with copy_out: the bytes of guest RAM, the pages made
    present first (a post-copy's before_access), and nothing read beyond a region."""
    memory = GuestMemory()
    low, high = RamRegion(0, 2 * MiB), RamRegion(4 * MiB, MiB)
    memory.add(low)
    memory.add(high)
    asked: list[tuple[int, int]] = []
    memory.before_access = lambda gpa, length: asked.append((gpa, length))
    into = ctypes.create_string_buffer(3 * PAGE_SIZE)
    try:
        memory.write(4 * MiB + PAGE_SIZE, b"\xa5" * PAGE_SIZE + b"tail")
        memory.copy_out(4 * MiB + PAGE_SIZE, ctypes.addressof(into), 2 * PAGE_SIZE)
        assert into.raw == b"\xa5" * PAGE_SIZE + b"tail" + bytes(2 * PAGE_SIZE - 4)
        assert asked[-1] == (4 * MiB + PAGE_SIZE, 2 * PAGE_SIZE)
        with pytest.raises(GuestMemoryError):  # spans the hole between the regions
            memory.copy_out(2 * MiB - PAGE_SIZE, ctypes.addressof(into), 2 * PAGE_SIZE)
    finally:
        low.close()
        high.close()
