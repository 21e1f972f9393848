"""KVM_PRE_FAULT_MEMORY on the lab's KVM (a TDP MMU): `Machine.pre_fault` maps guest pages into
KVM's page tables, as the kernel's per-VM statistics in debugfs count them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pyvmm.board.machine import Machine
from pyvmm.machine.console import CaptureConsole

pytestmark = pytest.mark.lab

DEBUGFS_KVM = Path("/sys/kernel/debug/kvm")
MiB = 1 << 20


def mapped_4k_pages(machine: Machine) -> int:
    """The 4 KiB mappings KVM's MMU holds for `machine` (debugfs kvm/<pid>-<vm fd>/pages_4k;
    all of them: the lab kernel has no transparent huge pages, so memfd RAM is in 4 KiB pages)."""
    if not DEBUGFS_KVM.is_dir():
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], check=True)
    return int((DEBUGFS_KVM / f"{os.getpid()}-{machine.vm.fd}" / "pages_4k").read_text())


def test_pre_fault_maps_the_pages_into_kvms_page_tables() -> None:
    with Machine(mem_size=16 * MiB, console=CaptureConsole()) as machine:
        assert machine.can_pre_fault
        machine.memory.write_pages(MiB, b"\x5a" * MiB)
        before = mapped_4k_pages(machine)
        assert machine.pre_fault(MiB, MiB)
        assert mapped_4k_pages(machine) == before + 256
        assert machine.pre_fault(MiB, MiB)  # mapped already: nothing more
        assert mapped_4k_pages(machine) == before + 256
        # a page pyvmm never wrote is mapped too (faulted into pyvmm's RAM on the way)
        assert machine.pre_fault(4 * MiB, 4096)
        assert mapped_4k_pages(machine) == before + 257
        assert machine.memory.read(MiB, 4) == b"\x5a" * 4
