"""Message-signalled interrupt vectors fed by irqfds: what MSI and MSI-X have in common.

Each vector owns an eventfd. While the vector is live (enabled and not masked, by whatever rule
its capability has) the eventfd is a KVM irqfd on a GSI whose MSI route carries the vector's
address and data, so raising it — from a device worker here, from the device itself under VFIO —
is one eventfd write that KVM turns into an interrupt without Python or a vCPU in the way.

A vector that is not live has no irqfd. Signals then accumulate in the eventfd's counter, which
*is* the pending bit: `pending()` reads it with a zero-timeout poll, and making the vector live
again re-assigns the irqfd, which KVM fires at once if the counter is non-zero (kvm_irqfd_assign
polls for an event already pending; it does not consume it, so the counter is then cleared
here). The same scheme works unchanged when VFIO signals the eventfds.

A route KVM refuses (a guest-written message it does not like) leaves that vector without an
interrupt, logged; the GSI is given back so the bad route never blocks later commits.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING

from pyvmm.kvm.errors import KvmError
from pyvmm.kvm.eventfd import EventFd

if TYPE_CHECKING:
    from pyvmm.kvm.irq import GsiRouting
    from pyvmm.kvm.vm import Vm

log = logging.getLogger(__name__)

_ERRORS = (OSError, KvmError, RuntimeError)
Message = tuple[int, int]  # (address, data)


class IrqfdVectors:
    """`count` vectors of one function; not thread-safe (its capability holds a lock)."""

    def __init__(self, vm: Vm, gsi: GsiRouting, count: int, what: str) -> None:
        self._vm = vm
        self._gsi_routing = gsi
        self._what = what
        self._gsi: list[int | None] = [None] * count
        self._route: list[Message | None] = [None] * count
        self._attached = [False] * count
        self._stack = ExitStack()
        self.eventfds = [self._stack.enter_context(EventFd()) for _ in range(count)]

    def signal(self, vector: int) -> None:
        """Raise `vector` (any thread): delivered now if live, else left pending. Out of range
        is ignored (a virtio queue whose vector the guest never set, say)."""
        if 0 <= vector < len(self.eventfds):
            self.eventfds[vector].signal()

    def sync(self, vector: int, message: Message | None) -> None:
        """Make KVM match one vector: live with `message` (routed, irqfd attached), or not
        live (None: irqfd detached, signals pend)."""
        self.sync_all({vector: message})

    def sync_all(self, messages: Mapping[int, Message | None]) -> None:
        """Make KVM match several vectors at once (an enable, a restore). The routes that
        changed reach KVM in one commit, made before any irqfd is attached: attaching one
        delivers a signal already pending, and it must find its route. A message the vector
        already has commits nothing."""
        live = {}
        for vector, message in messages.items():
            if message is not None:
                live[vector] = message
            elif self._attached[vector]:
                self._detach(vector)
        changed = {v: m for v, m in live.items() if self._route[v] != m}
        if changed:
            self._route_all(changed)
        for vector, message in live.items():
            if self._route[vector] == message and not self._attached[vector]:
                self._attach(vector, message)

    def _route_all(self, messages: dict[int, Message]) -> None:
        """Route each vector to its message in one commit; if KVM refuses the table, route
        them one commit each, so that only the vectors KVM refuses go without."""
        try:
            for vector, message in messages.items():
                gsi = self._gsi[vector]
                if gsi is None:
                    gsi = self._gsi[vector] = self._gsi_routing.allocate_gsi()
                self._route[vector] = None
                self._gsi_routing.set_msi(gsi, *message, commit=False)
            self._gsi_routing.commit()
        except _ERRORS as err:
            if len(messages) == 1:
                vector, message = next(iter(messages.items()))
                self._no_route(vector, message, err)
                return
            for vector in messages:
                self._drop_route(vector, commit=False)
            for vector, message in messages.items():
                self._route_all({vector: message})
            return
        for vector, message in messages.items():
            self._route[vector] = message

    def _attach(self, vector: int, message: Message) -> None:
        gsi = self._gsi[vector]
        assert gsi is not None
        try:
            self._vm.irqfd(self.eventfds[vector].fd, gsi)
        except _ERRORS as err:
            self._no_route(vector, message, err)
            return
        self._attached[vector] = True
        # KVM_IRQFD injected a signal already in the counter but left the counter as is
        # (later signals are consumed as they come); clear it, or a later mask would show it
        # as pending and deliver it twice.
        self.eventfds[vector].read()

    def _no_route(self, vector: int, message: Message, err: Exception) -> None:
        log.warning(
            "%s vector %d (address %#x data %#x) has no interrupt route: %s",
            self._what,
            vector,
            *message,
            err,
        )
        self._drop_route(vector)

    def pending(self, vectors: range) -> list[int]:
        """Vectors in `vectors` that are not live and have an unconsumed signal."""
        poller = select.poll()
        candidates = {}
        for vector in vectors:
            if not self._attached[vector]:
                fd = self.eventfds[vector].fd
                candidates[fd] = vector
                poller.register(fd, select.POLLIN)
        if not candidates:
            return []
        return sorted(candidates[fd] for fd, _ in poller.poll(0))

    def clear(self) -> None:
        """Forget every pending signal (a restore brings its own)."""
        for eventfd in self.eventfds:
            eventfd.read()

    def _detach(self, vector: int) -> None:
        gsi = self._gsi[vector]
        assert gsi is not None
        try:
            self._vm.irqfd_remove(self.eventfds[vector].fd, gsi)
        except _ERRORS as err:
            log.warning("%s vector %d: removing its irqfd failed: %s", self._what, vector, err)
        self._attached[vector] = False

    def _drop_route(self, vector: int, commit: bool = True) -> None:
        gsi = self._gsi[vector]
        if gsi is None:
            return
        if self._attached[vector]:
            self._detach(vector)
        self._gsi[vector] = None
        self._route[vector] = None
        self._gsi_routing.release_gsi(gsi)
        if not commit:
            return
        try:
            self._gsi_routing.commit()
        except _ERRORS as err:
            log.warning("GSI routing commit failed after dropping GSI %d: %s", gsi, err)

    def close(self) -> None:
        for vector in range(len(self.eventfds)):
            if self._attached[vector]:
                self._detach(vector)
            gsi = self._gsi[vector]
            if gsi is not None:
                self._gsi_routing.release_gsi(gsi)
                self._gsi[vector] = None
        self._stack.close()
