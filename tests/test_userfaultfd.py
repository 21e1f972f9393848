"""userfaultfd on this host: missing pages of memfd RAM fault into the fd and are filled from it,
for a thread of this process and for a vCPU inside KVM (what post-copy migration rests on)."""

from __future__ import annotations

import ctypes
import select
import threading
import time

import pytest
from guestbuild import guest, requires_kvm
from test_machine_layer import COUNTER, assert_consecutive, counts

from pyvmm.board.machine import Machine
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.kvm.userfaultfd import UserFaultFd, UserfaultfdUnavailable
from pyvmm.machine.console import CaptureConsole
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


def next_faults(uffd: UserFaultFd, timeout: float = 10.0) -> list[tuple[int, bool]]:
    ready, _, _ = select.select([uffd], [], [], timeout)
    assert ready, f"no page fault within {timeout} s"
    return uffd.faults()


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


def run_counter_on_demand(uffd: UserFaultFd) -> None:
    """The counter guest's code is in RAM; the page it counts in is not, nor is what else it
    touches first: each faults to the fd from inside KVM_RUN, and the guest runs on once it
    is filled (here, and in the lab: tests/lab/test_lab_userfaultfd.py)."""
    with Machine(mem_size=64 * MiB, console=CaptureConsole()) as machine:
        machine.load_elf(str(guest("counter")))
        (region,) = [r for r in machine.memory.regions if r.contains(COUNTER)]
        uffd.register(region.host_addr, region.size)
        machine.start()
        counter_page = region.host_addr + (COUNTER - region.gpa) // PAGE_SIZE * PAGE_SIZE
        filled: list[int] = []
        before_the_counter = None
        deadline = time.monotonic() + 20
        while counter_page not in filled and time.monotonic() < deadline:
            for page, _ in next_faults(uffd):
                if page == counter_page:
                    before_the_counter = machine.console.text  # type: ignore[attr-defined]
                assert uffd.zero(page, PAGE_SIZE)
                filled.append(page)
        assert counter_page in filled
        assert before_the_counter is not None and counts(before_the_counter) == []
        machine.console.wait_for(r"count 4096\n", 20)  # type: ignore[attr-defined]
        machine.stop()
        machine.wait()
        assert_consecutive(counts(machine.console.text))  # type: ignore[attr-defined]
        assert len(filled) == len(set(filled))
