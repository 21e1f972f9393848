"""Recording stand-ins for the kernel objects parts of a machine are given, for tests without
KVM or VFIO: KVM's memory slots (`RecordingSlots`), a VFIO DMA space (`RecordingDma`), the VM's
irqfds and ioeventfds (`FakeVm`) and its GSI routing (`FakeGsi`). Each records what would have
been asked of the kernel, for the test to check; `FakeVm` and `FakeGsi` are the `vm` and `gsi`
of what a device is given of its machine (`pyvmm.machine.host.DeviceHost`)."""

from __future__ import annotations

import select
from collections.abc import Callable

from pyvmm.uapi import kvm as uapi
from pyvmm.vfio.errors import VfioError

PAGE = 4096


class RecordingSlots:
    """KVM's memory slots as KVM_SET_USER_MEMORY_REGION leaves them (a size of 0 deletes),
    with a dirty bitmap a test can set."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int, int, int]] = {}  # slot -> gpa, size, host, flags
        self.dirty: dict[int, set[int]] = {}  # slot -> page numbers KVM would report

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        if size == 0:
            del self.slots[slot]
            return
        for other, (ogpa, osize, _, _) in self.slots.items():
            assert other == slot or not (ogpa < gpa + size and gpa < ogpa + osize), "overlap"
        self.slots[slot] = (gpa, size, host_addr, flags)

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        assert self.slots[slot][3] & uapi.KVM_MEM_LOG_DIRTY_PAGES
        pages = self.dirty.pop(slot, set())
        bits = sum(1 << page for page in pages)
        return bits.to_bytes((size // PAGE + 63) // 64 * 8, "little")


class RecordingDma:
    """A VFIO DMA space that records its mappings ({iova: (vaddr, size)}), reports the usable
    IOVA `ranges` it is given and refuses the map at `fail_at`."""

    def __init__(self, ranges: tuple[tuple[int, int], ...] = (), fail_at: int | None = None):
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


class FakeVm:
    """Records the irqfds and ioeventfds a device asks KVM for."""

    def __init__(self) -> None:
        self.irqfds: dict[int, int] = {}
        self.ioeventfds: dict[tuple[int, int], int] = {}
        self.fired_on_assign: list[int] = []

    def irqfd(self, fd: int, gsi: int) -> None:
        assert fd not in self.irqfds, "irqfd assigned twice"
        self.irqfds[fd] = gsi
        if readable(fd):  # KVM injects an event already pending when the irqfd is assigned
            self.fired_on_assign.append(gsi)

    def irqfd_remove(self, fd: int, gsi: int) -> None:
        assert self.irqfds.pop(fd) == gsi

    def ioeventfd(self, fd: int, addr: int, length: int) -> None:
        assert (addr, length) not in self.ioeventfds
        self.ioeventfds[(addr, length)] = fd

    def ioeventfd_remove(self, fd: int, addr: int, length: int) -> None:
        assert self.ioeventfds.pop((addr, length)) == fd

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        """No KVM here: memory slots are the address space's bookkeeping only."""

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        return bytes((size // 4096 + 63) // 64 * 8)


class FakeGsi:
    """GSI routing that can be told to refuse routes, as KVM might."""

    def __init__(self) -> None:
        self.routes: dict[int, tuple[int, int]] = {}
        self.free: list[int] = []
        self.next_gsi = 24
        self.commits = 0
        self.refuse: Callable[[int, int], bool] = lambda address, data: False

    def allocate_gsi(self) -> int:
        if self.free:
            return self.free.pop()
        self.next_gsi += 1
        return self.next_gsi - 1

    def release_gsi(self, gsi: int) -> None:
        self.routes.pop(gsi, None)
        self.free.append(gsi)

    def set_msi(self, gsi: int, address: int, data: int, *, commit: bool = True) -> None:
        self.routes[gsi] = (address, data)
        if commit:
            self.commit()

    def commit(self) -> None:
        self.commits += 1
        if any(self.refuse(*route) for route in self.routes.values()):
            raise OSError(22, "KVM_SET_GSI_ROUTING: Invalid argument")


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])
