"""The guest-physical address space: where each region lies and the KVM memory slot it has.

This is the one place that calls KVM_SET_USER_MEMORY_REGION. It gives RAM and DEVICE regions a
slot number (the lowest free one, reused after a removal), refuses a region that overlaps
another (RESERVED ones included), moves DEVICE regions when their BAR moves, and tells its
listeners about every region added or removed, as QEMU's memory listeners are told: the DMA
mapping of assigned devices (pyvmm.vfio.dma_space) and the dirty log (pyvmm.machine.dirty)
follow the map instead of being called by hand. A listener registered late is told about the regions
already there; if a listener refuses a region, the add is undone and the error raised.

Thread-safe: BAR moves arrive on vCPU threads while other threads may read the map.
"""

from __future__ import annotations

import bisect
import heapq
import threading
from typing import Protocol

from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.machine.memory import GuestMemory, MemoryRegion, RamRegion, RegionKind
from pyvmm.uapi import kvm as uapi


class SlotTable(Protocol):
    """What the address space needs of a KVM VM (pyvmm.kvm.vm.Vm)."""

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0
    ) -> None: ...

    def get_dirty_log(self, slot: int, size: int) -> bytes: ...


class AddressSpaceListener(Protocol):
    def region_added(self, region: MemoryRegion) -> None:
        """`region` is now in the map (raise to refuse it: the add is undone)."""

    def region_removed(self, region: MemoryRegion) -> None:
        """`region` is leaving the map (its memory is still there during the call)."""


class AddressSpaceError(ValueError):
    """A region cannot go where it was asked to."""


def _announce(pairs: list[tuple[AddressSpaceListener, MemoryRegion]]) -> None:
    """Tell each listener of its region, in order; if one refuses, tell those already told of
    the removal, in reverse, and raise."""
    told: list[tuple[AddressSpaceListener, MemoryRegion]] = []
    try:
        for listener, region in pairs:
            listener.region_added(region)
            told.append((listener, region))
    except BaseException:
        for listener, region in reversed(told):
            listener.region_removed(region)
        raise


class _SlotNumbers:
    """KVM slot numbers, lowest free first, without a list of all of them (KVM offers 32764:
    building that list was a fifth of a restore's time)."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._next = 0  # numbers from here up were never taken
        self._returned: list[int] = []  # a heap of numbers below _next given back

    def take(self) -> int | None:
        if self._returned:
            return heapq.heappop(self._returned)
        if self._next == self._count:
            return None
        self._next += 1
        return self._next - 1

    def give_back(self, number: int) -> None:
        heapq.heappush(self._returned, number)


class AddressSpace:
    """Regions by address, their KVM slots, and the listeners that follow them."""

    def __init__(self, vm: SlotTable, max_slots: int, *, phys_bits: int = 48) -> None:
        self._vm = vm
        self.limit = 1 << phys_bits  # guest-physical addresses end here (the CPU's MAXPHYADDR)
        self._lock = threading.RLock()
        self._regions: list[MemoryRegion] = []  # sorted by gpa
        self._slots = _SlotNumbers(max_slots)
        self._listeners: list[AddressSpaceListener] = []
        self._logging: set[MemoryRegion] = set()
        self.memory = GuestMemory()

    # the map

    def regions(self, kind: RegionKind | None = None) -> list[MemoryRegion]:
        with self._lock:
            return [r for r in self._regions if kind is None or r.kind is kind]

    def find(self, gpa: int) -> MemoryRegion | None:
        with self._lock:
            i = bisect.bisect_right([r.gpa for r in self._regions], gpa) - 1
            if i >= 0 and gpa < self._regions[i].end:
                return self._regions[i]
            return None

    def _check_free(self, gpa: int, size: int, moving: MemoryRegion | None = None) -> None:
        if gpa + size > self.limit:
            raise AddressSpaceError(
                f"{gpa:#x}+{size:#x} is beyond the guest's physical address space ({self.limit:#x})"
            )
        for other in self._regions:
            if other is not moving and other.gpa < gpa + size and gpa < other.end:
                raise AddressSpaceError(
                    f"{gpa:#x}+{size:#x} overlaps {other.kind.value} region {other.name} "
                    f"at {other.gpa:#x}+{other.size:#x}"
                )

    def add(self, region: MemoryRegion) -> None:
        """Put `region` in the map (with a KVM slot unless it is RESERVED)."""
        with self._lock:
            if region in self._regions:
                raise AddressSpaceError(f"{region.name} is already in the address space")
            self._check_free(region.gpa, region.size)
            if region.kind is not RegionKind.RESERVED:
                region.slot = self._slots.take()
                if region.slot is None:
                    raise AddressSpaceError(f"no KVM memory slot left for {region.name}")
                try:
                    self._install(region)
                except BaseException:
                    self._slots.give_back(region.slot)
                    region.slot = None
                    raise
            bisect.insort(self._regions, region, key=lambda r: r.gpa)
            if isinstance(region, RamRegion):
                self.memory.add(region)
            try:
                _announce([(listener, region) for listener in self._listeners])
            except BaseException:
                self._drop(region)
                raise

    def remove(self, region: MemoryRegion) -> None:
        """Take `region` out of the map; listeners hear of it while its memory is still there.
        A RAM region's memory stays open (GuestMemory closes it with the machine)."""
        with self._lock:
            if region not in self._regions:
                raise AddressSpaceError(f"{region.name} is not in the address space")
            try:
                self._tell_removed(region)
            finally:
                self._drop(region)

    def _drop(self, region: MemoryRegion) -> None:
        self._regions.remove(region)
        if isinstance(region, RamRegion):
            self.memory.regions.remove(region)
        self._logging.discard(region)
        if region.slot is not None:
            self._vm.set_user_memory_region(region.slot, region.gpa, 0, region.host_addr)
            self._slots.give_back(region.slot)
            region.slot = None

    def move(self, region: MemoryRegion, gpa: int) -> None:
        """Move a DEVICE region (a BAR the guest reprogrammed) to `gpa`, keeping its slot
        (KVM moves the slot as a whole). Listeners hear of a removal, then an addition."""
        with self._lock:
            if region.kind is not RegionKind.DEVICE:
                raise AddressSpaceError(f"only device memory moves, not {region.name}")
            if region not in self._regions:
                raise AddressSpaceError(f"{region.name} is not in the address space")
            if gpa % PAGE_SIZE:
                raise AddressSpaceError(f"{region.name}: {gpa:#x} is not page aligned")
            self._check_free(gpa, region.size, moving=region)
            self._tell_removed(region)
            old = region.gpa
            region.gpa = gpa
            try:
                self._install(region)
            except BaseException:
                region.gpa = old
                raise
            finally:
                self._regions.sort(key=lambda r: r.gpa)
                try:
                    _announce([(listener, region) for listener in self._listeners])
                except BaseException:
                    self._drop(region)  # a listener refused it where it is now: it goes
                    raise

    def _tell_removed(self, region: MemoryRegion) -> None:
        """Tell every listener (the last registered first), even when one of them raises;
        then raise the first error."""
        errors = []
        for listener in reversed(self._listeners):
            try:
                listener.region_removed(region)
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]

    def _install(self, region: MemoryRegion) -> None:
        assert region.slot is not None
        flags = uapi.KVM_MEM_READONLY if region.read_only else 0
        if region in self._logging:
            flags |= uapi.KVM_MEM_LOG_DIRTY_PAGES
        self._vm.set_user_memory_region(
            region.slot, region.gpa, region.size, region.host_addr, flags
        )

    # listeners

    def listen(self, listener: AddressSpaceListener) -> None:
        """Follow the map from now on; told first of every region already in it."""
        with self._lock:
            _announce([(listener, region) for region in self._regions])
            self._listeners.append(listener)

    def unlisten(self, listener: AddressSpaceListener) -> None:
        """Stop following the map; told of the removal of every region still in it."""
        with self._lock:
            self._listeners.remove(listener)
            for region in reversed(self._regions):
                listener.region_removed(region)

    # dirty logging (a property of the slot, so the slot's owner sets it)

    def set_dirty_logging(self, region: MemoryRegion, enabled: bool) -> None:
        """Turn KVM's dirty log on or off for a RAM region's slot."""
        with self._lock:
            if region.kind is not RegionKind.RAM:
                raise AddressSpaceError(f"only RAM is dirty-logged, not {region.name}")
            if enabled == (region in self._logging):
                return
            if enabled:
                self._logging.add(region)
            else:
                self._logging.discard(region)
            self._install(region)

    def get_dirty_log(self, region: MemoryRegion) -> bytes:
        """KVM's dirty bitmap of a logged RAM region, one bit per page (read and re-armed)."""
        with self._lock:
            if region not in self._logging:
                raise AddressSpaceError(f"{region.name} is not dirty-logged")
            assert region.slot is not None
            return self._vm.get_dirty_log(region.slot, region.size)
