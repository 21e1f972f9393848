"""GSI routing: which interrupt each KVM GSI delivers (an IOAPIC/PIC pin, or an MSI message).

KVM replaces the whole routing table on each KVM_SET_GSI_ROUTING, so `GsiRouting` keeps the table:
the default ISA/IOAPIC pin routes that KVM_CREATE_IRQCHIP installs, plus MSI routes allocated for
devices (emulated MSI-X vectors, passthrough MSI/MSI-X). Each route is fed by an irqfd, so an
interrupt never passes through Python.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.uapi import kvm as uapi

if TYPE_CHECKING:
    from pyvmm.kvm.vm import Vm

IOAPIC_PINS = uapi.KVM_IOAPIC_NUM_PINS
PIC_PINS = 16


@dataclass(frozen=True)
class IrqchipRoute:
    """GSI -> pin of an in-kernel interrupt controller."""

    gsi: int
    chip: int
    pin: int

    def fill(self, entry: uapi.kvm_irq_routing_entry) -> None:
        entry.gsi = self.gsi
        entry.type = uapi.KVM_IRQ_ROUTING_IRQCHIP
        entry.u.irqchip.irqchip = self.chip
        entry.u.irqchip.pin = self.pin


@dataclass(frozen=True)
class MsiRoute:
    """GSI -> an MSI message (address, data) delivered to the local APICs."""

    gsi: int
    address: int
    data: int

    def fill(self, entry: uapi.kvm_irq_routing_entry) -> None:
        entry.gsi = self.gsi
        entry.type = uapi.KVM_IRQ_ROUTING_MSI
        entry.u.msi.address_lo = self.address & 0xFFFFFFFF
        entry.u.msi.address_hi = self.address >> 32
        entry.u.msi.data = self.data


Route = IrqchipRoute | MsiRoute


def default_irqchip_routes() -> list[IrqchipRoute]:
    """The routes KVM_CREATE_IRQCHIP installs on x86: ISA IRQs to both PICs and the IOAPIC."""
    routes: list[IrqchipRoute] = []
    for gsi in range(PIC_PINS):
        if gsi == 2:
            continue  # the cascade
        chip = uapi.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else uapi.KVM_IRQCHIP_PIC_SLAVE
        routes.append(IrqchipRoute(gsi, chip, gsi % 8))
    for pin in range(IOAPIC_PINS):
        # ISA IRQ0 (the PIT) is wired to IOAPIC pin 2, as on real chipsets.
        gsi = 0 if pin == 2 else pin
        if pin == 0:
            continue
        routes.append(IrqchipRoute(gsi, uapi.KVM_IRQCHIP_IOAPIC, pin))
    return routes


class GsiRouting:
    """The VM's GSI routing table, with allocation of GSIs for MSI routes."""

    def __init__(self, vm: Vm, max_routes: int) -> None:
        self._vm = vm
        self._lock = threading.Lock()  # the table
        #: One commit at a time, the table read inside it: KVM_SET_GSI_ROUTING releases the
        #: GIL, and two commits racing (two vCPUs programming MSI-X on two functions) could
        #: otherwise land the older table last, a live vector's route lost under its irqfd.
        self._commit_lock = threading.Lock()
        self._irqchip = default_irqchip_routes()
        self._msi: dict[int, MsiRoute] = {}
        self._next_gsi = IOAPIC_PINS
        self._free: list[int] = []
        self._max = max_routes

    def allocate_gsi(self) -> int:
        """A GSI above the IOAPIC pins, for an MSI route."""
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._next_gsi >= self._max:
                raise RuntimeError(f"out of GSIs (KVM allows {self._max} routes)")
            gsi = self._next_gsi
            self._next_gsi += 1
            return gsi

    def release_gsi(self, gsi: int) -> None:
        with self._lock:
            self._msi.pop(gsi, None)
            self._free.append(gsi)

    def set_msi(self, gsi: int, address: int, data: int, *, commit: bool = True) -> None:
        """Point `gsi` at an MSI message; KVM sees it on `commit()`."""
        with self._lock:
            self._msi[gsi] = MsiRoute(gsi, address, data)
        if commit:
            self.commit()

    def routes(self) -> list[Route]:
        with self._lock:
            return [*self._irqchip, *self._msi.values()]

    def commit(self) -> None:
        """Hand KVM the table as it is now. Commits are serialised and each reads the table
        once it holds the commit lock, so the last to reach KVM has every route set before it."""
        with self._commit_lock:
            self._vm.set_gsi_routing(self.routes())
