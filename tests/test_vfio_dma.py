"""Mapping guest RAM for device DMA, against a recording DmaSpace (the lab tests the real ones)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvmm.machine.memory import GuestMemory, RamRegion
from pyvmm.vfio.dma import map_guest_memory
from pyvmm.vfio.errors import VfioError

MiB = 1 << 20


class RecordingSpace:
    def __init__(self, ranges: tuple[tuple[int, int], ...], fail_at: int | None = None) -> None:
        self.ranges = ranges
        self.fail_at = fail_at
        self.mapped: dict[int, tuple[int, int]] = {}

    def map(self, iova: int, vaddr: int, size: int, *, writable: bool = True) -> None:
        if iova == self.fail_at:
            raise VfioError("no more mappings")
        self.mapped[iova] = (vaddr, size)

    def unmap(self, iova: int, size: int) -> int:
        return self.mapped.pop(iova)[1]

    def iova_ranges(self) -> tuple[tuple[int, int], ...]:
        return self.ranges


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory()
    mem.add(RamRegion(0, 4 * MiB))
    mem.add(RamRegion(1 << 32, 2 * MiB))
    yield mem
    mem.close()


def test_every_region_is_mapped_at_its_guest_physical_address(memory: GuestMemory) -> None:
    space = RecordingSpace(((0, (1 << 48) - 1),))
    assert map_guest_memory(space, memory) == [(0, 4 * MiB), (1 << 32, 2 * MiB)]
    assert space.mapped == {r.gpa: (r.host_addr, r.size) for r in memory.regions}


def test_ram_outside_the_usable_iovas_is_refused_and_nothing_stays_mapped(
    memory: GuestMemory,
) -> None:
    space = RecordingSpace(((0, 0xFEDFFFFF),))  # the high region is beyond it
    with pytest.raises(VfioError, match=r"guest RAM 0x100000000-0x1001fffff is outside"):
        map_guest_memory(space, memory)
    assert space.mapped == {}


def test_a_failed_map_undoes_the_earlier_ones(memory: GuestMemory) -> None:
    space = RecordingSpace((), fail_at=1 << 32)  # no ranges reported: nothing is known
    with pytest.raises(VfioError, match="no more mappings"):
        map_guest_memory(space, memory)
    assert space.mapped == {}
