"""userfaultfd on this host: missing pages of memfd RAM fault into the fd and are filled from it,
for a thread of this process and for a vCPU inside KVM (what post-copy migration rests on)."""

from __future__ import annotations

import ctypes
import threading
import time

import pytest
from counting import next_faults, run_counter_on_demand
from guestbuild import requires_kvm

from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.kvm.userfaultfd import UserFaultFd, UserfaultfdUnavailable
from pyvmm.machine.memory import RamRegion

MiB = 1 << 20


def touch(addr: int, value: int | None = None) -> int:
    """Read (or write) one byte at a host address in C, without the GIL: a thread that faults
    with the GIL held would stop every other thread of this process, the fd's reader too."""
    byte = ctypes.c_uint8(0 if value is None else value)
    if value is None:
        ctypes.memmove(ctypes.addressof(byte), addr, 1)
    else:
        ctypes.memmove(addr, ctypes.addressof(byte), 1)
    return byte.value


@pytest.fixture
def uffd() -> UserFaultFd:
    try:
        fd = UserFaultFd()
    except UserfaultfdUnavailable as err:
        pytest.fail(f"this host should have userfaultfd: {err}")
    yield fd
    fd.close()


def test_a_thread_touching_a_missing_page_waits_for_it_to_be_copied(uffd: UserFaultFd) -> None:
    region = RamRegion(0, 4 * MiB, "ram")
    try:
        region.view[0] = 7  # present: no fault
        uffd.register(region.host_addr, region.size)
        assert uffd.faults() == []
        seen: list[int] = []
        reader = threading.Thread(
            target=lambda: seen.append(touch(region.host_addr + 3 * PAGE_SIZE + 5))
        )
        reader.start()
        page = region.host_addr + 3 * PAGE_SIZE
        assert next_faults(uffd) == [(page, False)]
        time.sleep(0.05)
        assert seen == []  # it waits
        assert uffd.copy(page, bytes(range(256)) * 16)
        reader.join(10)
        assert seen == [5]
        assert region.view[0] == 7
        assert not uffd.copy(page, bytes(PAGE_SIZE))  # there already: kept as it is
        assert region.view[3 * PAGE_SIZE + 5] == 5
        # a range with a page there already: the others are filled, that one is kept
        assert not uffd.copy(region.host_addr + 2 * PAGE_SIZE, b"\x11" * (3 * PAGE_SIZE))
        assert region.view[2 * PAGE_SIZE] == 0x11 and region.view[4 * PAGE_SIZE] == 0x11
        assert region.view[3 * PAGE_SIZE + 5] == 5
        writer = threading.Thread(target=lambda: touch(region.host_addr + 8 * PAGE_SIZE, 9))
        writer.start()
        assert next_faults(uffd) == [(region.host_addr + 8 * PAGE_SIZE, True)]
        assert uffd.zero(region.host_addr + 8 * PAGE_SIZE, 2 * PAGE_SIZE)
        writer.join(10)
        assert region.view[8 * PAGE_SIZE] == 9 and region.view[9 * PAGE_SIZE] == 0
        uffd.unregister(region.host_addr, region.size)
        assert region.view[100 * PAGE_SIZE] == 0  # the kernel's again: zero-filled
    finally:
        region.close()


@pytest.mark.kvm
@requires_kvm
def test_a_vcpu_touching_a_missing_page_waits_in_kvm_until_it_is_filled(
    uffd: UserFaultFd,
) -> None:
    run_counter_on_demand(uffd)
