"""GsiRouting: KVM replaces the whole table at each commit, so the commits must never let an older
table reach KVM after a newer one."""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from guestbuild import requires_kvm

from pyvmm.devices.pci.msix import MSIX_FLAGS_ENABLE, Msix
from pyvmm.kvm.eventfd import EventFd
from pyvmm.kvm.irq import GsiRouting, MsiRoute, Route
from pyvmm.kvm.system import System
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.vm import Vm
from pyvmm.uapi import kvm as uapi


class SlowKvm:
    """A VM whose first KVM_SET_GSI_ROUTING takes a while, as an ioctl with the GIL released
    may: what it is handed is what KVM's table is left as, in the order the calls finish."""

    def __init__(self) -> None:
        self.tables: list[list[Route]] = []
        self.first_in = threading.Event()
        self.release = threading.Event()
        self._calls = 0

    def set_gsi_routing(self, routes: list[Route]) -> None:
        self._calls += 1
        if self._calls == 1:
            self.first_in.set()
            self.release.wait(10)
        self.tables.append(list(routes))


def msi_gsis(table: list[Route]) -> set[int]:
    return {route.gsi for route in table if isinstance(route, MsiRoute)}


def test_a_commit_never_lands_an_older_table_after_a_newer_one() -> None:
    """Two vCPUs program MSI-X vectors on two functions at once: the first commit's ioctl is
    slow; the second vector's commit must not reach KVM before it, or the first's older table
    (without the second route) lands last and the second vector's interrupts are lost."""
    kvm = SlowKvm()
    routing = GsiRouting(kvm, 1024)  # type: ignore[arg-type]
    first, second = routing.allocate_gsi(), routing.allocate_gsi()
    one = threading.Thread(target=routing.set_msi, args=(first, 0xFEE00000, 0x41))
    one.start()
    assert kvm.first_in.wait(10)
    two = threading.Thread(target=routing.set_msi, args=(second, 0xFEE00000, 0x42))
    two.start()
    time.sleep(0.2)  # the second commit, left to run, would finish first
    kvm.release.set()
    one.join(10)
    two.join(10)
    assert msi_gsis(kvm.tables[-1]) == {first, second}


def test_many_threads_setting_routes_leave_kvm_with_all_of_them() -> None:
    kvm = SlowKvm()
    kvm.release.set()
    routing = GsiRouting(kvm, 1024)  # type: ignore[arg-type]
    gsis = [routing.allocate_gsi() for _ in range(32)]
    threads = [
        threading.Thread(target=routing.set_msi, args=(gsi, 0xFEE00000, 0x40 + i))
        for i, gsi in enumerate(gsis)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert msi_gsis(kvm.tables[-1]) == set(gsis)
    assert len(kvm.tables) == len(gsis)  # one commit each: set_msi's own


# -- on a real VM: a route is in KVM's table when an irqfd on its GSI reaches the LAPIC ---------

APIC_SVR = 0xF0
APIC_SVR_ENABLED = 0x100
APIC_IRR = 0x200  # eight 32-bit registers, 16 bytes apart
MSI_ADDRESS = 0xFEE0_0000  # to APIC ID 0, physical, fixed


@contextlib.contextmanager
def lapic_vm() -> Iterator[tuple[Vm, Vcpu, GsiRouting]]:
    """A VM with an in-kernel irqchip and one vCPU that never runs, its LAPIC enabled: an MSI
    that reaches it sets its vector's bit in the IRR, which KVM_GET_LAPIC reads back."""
    with System() as system, system.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        lapic = bytearray(vcpu.get_lapic())
        struct.pack_into("<I", lapic, APIC_SVR, 0xFF | APIC_SVR_ENABLED)
        vcpu.set_lapic(bytes(lapic))
        routing = GsiRouting(vm, system.check_extension(uapi.KvmCap.IRQ_ROUTING))
        routing.commit()
        try:
            yield vm, vcpu, routing
        finally:
            vcpu.close()


def requested(vcpu: Vcpu) -> set[int]:
    """The vectors the vCPU's LAPIC has in its IRR."""
    lapic = vcpu.get_lapic()
    return {
        index * 32 + bit
        for index in range(8)
        for bit in range(32)
        if struct.unpack_from("<I", lapic, APIC_IRR + 16 * index)[0] >> bit & 1
    }


def raise_through_irqfd(vm: Vm, gsi: int) -> None:
    with EventFd() as eventfd:
        vm.irqfd(eventfd.fd, gsi)
        eventfd.signal()
        vm.irqfd_remove(eventfd.fd, gsi)


@pytest.mark.kvm
@requires_kvm
def test_routes_set_by_many_threads_at_once_all_reach_kvm() -> None:
    with lapic_vm() as (vm, vcpu, routing):
        vectors = range(0x40, 0x80)
        gsis = {vector: routing.allocate_gsi() for vector in vectors}
        start = threading.Barrier(len(gsis))

        def program(gsi: int, vector: int) -> None:
            start.wait(10)
            routing.set_msi(gsi, MSI_ADDRESS, vector)

        threads = [threading.Thread(target=program, args=(g, v)) for v, g in gsis.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert requested(vcpu) == set()
        for gsi in gsis.values():
            raise_through_irqfd(vm, gsi)
        assert requested(vcpu) == set(vectors)


class CountingVm:
    """A real VM whose routing commits are counted."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.commits = 0

    def set_gsi_routing(self, routes: list[Route]) -> None:
        self.commits += 1
        self.vm.set_gsi_routing(routes)

    def __getattr__(self, name: str) -> object:
        return getattr(self.vm, name)


@pytest.mark.kvm
@requires_kvm
def test_an_msix_enable_and_a_restore_commit_the_routes_once_and_a_same_write_not_at_all() -> None:
    with lapic_vm() as (vm, vcpu, _):
        counting = CountingVm(vm)
        routing = GsiRouting(counting, 1024)  # type: ignore[arg-type]
        msix = Msix(counting, routing, 8, table=(0, 0), pba=(0, 0x800))  # type: ignore[arg-type]
        try:
            for vector in range(8):  # the driver fills the table while MSI-X is off
                msix.table_write(vector * 16, 4, MSI_ADDRESS)
                msix.table_write(vector * 16 + 8, 4, 0x50 + vector)
                msix.table_write(vector * 16 + 12, 4, 0)  # unmasked
            assert counting.commits == 0  # nothing is live yet
            msix.set_control(MSIX_FLAGS_ENABLE)
            assert counting.commits == 1
            for vector in range(8):
                msix.signal(vector)
            assert requested(vcpu) == set(range(0x50, 0x58))
            msix.table_write(3 * 16 + 8, 4, 0x53)  # the data it has
            assert counting.commits == 1
            msix.table_write(3 * 16 + 8, 4, 0x60)  # a new vector: one commit for it
            assert counting.commits == 2
            saved = msix.save()
            msix.set_control(0)
            assert counting.commits == 2  # turning vectors off leaves their routes
            msix.restore(saved)
            assert counting.commits == 2  # the routes were still the saved ones
        finally:
            msix.close()
        # a restore into a new function (a restored machine's) routes all 8 in one commit
        restored = Msix(counting, routing, 8, table=(0, 0), pba=(0, 0x800))  # type: ignore[arg-type]
        try:
            restored.restore(saved)
            assert counting.commits == 3
            assert requested(vcpu) == set(range(0x50, 0x58))  # (nothing new yet)
            restored.signal(3)
            assert 0x60 in requested(vcpu)
        finally:
            restored.close()
