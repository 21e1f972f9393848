"""Resource hygiene: creating and destroying VMs leaks no file descriptors or mappings."""

from __future__ import annotations

import os

import pytest
from guestbuild import guest, requires_kvm

from pyvmm.board.machine import Machine
from pyvmm.kvm.system import System

pytestmark = [pytest.mark.kvm, requires_kvm]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_fifty_vms_leave_fd_count_unchanged() -> None:
    with Machine(mem_size=8 << 20, vcpus=2) as warmup:  # imports, caches, kick handler
        warmup.load_elf(str(guest("hello")))
        warmup.run(timeout=30)
    before_fds, before_maps = open_fds(), mappings()
    for _ in range(50):
        with Machine(mem_size=8 << 20, vcpus=2) as machine:
            machine.load_elf(str(guest("hello")))
            assert machine.run(timeout=30).exit_code == 0
    assert open_fds() == before_fds
    assert mappings() <= before_maps + 2  # allocator arenas may grow, guest RAM may not stay


def test_raw_vm_objects_close_their_fds() -> None:
    before = open_fds()
    for _ in range(50):
        with System() as kvm, kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            vcpu.close()
    assert open_fds() == before


def test_failed_boot_releases_everything(tmp_path) -> None:
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"nope")
    before = open_fds()
    for _ in range(10):
        with Machine(mem_size=8 << 20) as machine, pytest.raises(Exception, match="not an ELF"):
            machine.load_elf(str(bad))
    assert open_fds() == before
