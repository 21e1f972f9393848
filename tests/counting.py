"""The counting guests and what tests read of them. The counter guest (guests/README.md) counts
in r12 and in RAM at `COUNTER`, and prints a `count N` line every 1024: `counting_machine` builds
a machine with it loaded, `console_of` and `count_in_ram` read how far it got, `counts` and
`assert_consecutive` check that its lines ran on with none lost or repeated, and
`run_counter_on_demand` runs it with its RAM filled from a userfaultfd (`next_faults` reads that
fd). memtouch's lines are `pass N` (`counts_of_passes`); `digest` stands for all of a machine's
RAM, to compare with a copy's."""

from __future__ import annotations

import hashlib
import re
import select
import struct
import time

from guestbuild import guest

from pyvmm.board.machine import Machine
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.kvm.userfaultfd import UserFaultFd
from pyvmm.machine import layout
from pyvmm.machine.console import CaptureConsole

MiB = layout.MiB
COUNTER = 0x1F00000  # where the counter guest stores r12 (guests/README.md)


def console_of(machine: Machine) -> CaptureConsole:
    assert isinstance(machine.console, CaptureConsole)
    return machine.console


def count_in_ram(machine: Machine) -> int:
    return struct.unpack("<Q", machine.memory.read(COUNTER, 8))[0]


def counts(text: str) -> list[int]:
    """The counter guest's `count N` lines (whole lines only)."""
    return [int(n) for n in re.findall(r"^count (\d+)\n", text, re.M)]


def assert_consecutive(values: list[int]) -> None:
    assert values, "no count lines"
    assert values == [1024 * k for k in range(1, len(values) + 1)], values


def counting_machine(mem: int = 64 * MiB) -> Machine:
    machine = Machine(mem_size=mem, console=CaptureConsole())
    machine.load_elf(str(guest("counter")))
    machine.add_device("virtio-rng")
    return machine


def digest(machine: Machine) -> str:
    ram = hashlib.sha256()
    for region in machine.memory.regions:
        ram.update(region.view)
    return ram.hexdigest()


def counts_of_passes(text: str) -> list[int]:
    """The counts of memtouch's whole "pass N" lines in `text` (a console cut at a switch-over
    may end inside one)."""
    return [int(count) for count in re.findall(r"^pass (\d+)\n", text, re.MULTILINE)]


def next_faults(uffd: UserFaultFd, timeout: float = 10.0) -> list[tuple[int, bool]]:
    ready, _, _ = select.select([uffd], [], [], timeout)
    assert ready, f"no page fault within {timeout} s"
    return uffd.faults()


def run_counter_on_demand(uffd: UserFaultFd) -> None:
    """The counter guest's code is in RAM; the page it counts in is not, nor is what else it
    touches first: each faults to the fd from inside KVM_RUN, and the guest runs on once it
    is filled (tests/test_userfaultfd.py, and in the lab: tests/lab/test_lab_userfaultfd.py)."""
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
