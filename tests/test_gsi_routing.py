"""GsiRouting: KVM replaces the whole table at each commit, so the commits must never let an older
table reach KVM after a newer one."""

from __future__ import annotations

import threading
import time

from pyvmm.kvm.irq import GsiRouting, MsiRoute, Route


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
