"""A passed-through device's interrupts: which of INTx, MSI and MSI-X it signals now, and the
eventfds it signals them on, none of it through Python while the guest runs.

- INTx: VFIO signals a trigger eventfd that is a KVM irqfd with a resamplefd on the slot's GSI.
  VFIO masks the line when it fires (it is level-triggered); KVM signals the resamplefd at the
  guest's EOI, and that eventfd is VFIO's unmask eventfd, so the line is re-armed in the kernel.
  Where VFIO refuses an unmask eventfd, a thread here waits on the resamplefd and unmasks with
  VFIO_DEVICE_SET_IRQS (said in the log: that path is Python's). The irqfd exists only while
  INTx is the index in use: removing it de-asserts the line KVM held, which other slots share.
- MSI and MSI-X: emulated in config space and the trapped MSI-X table
  (pyvmm.devices.pci.msi, .msix): each vector's eventfd is an irqfd on its MSI route while the
  guest has it unmasked, and the same eventfds are handed to VFIO, so the device's interrupt
  is one eventfd write into KVM. A masked vector's signals wait in its eventfd (its PBA bit).

VFIO lets a device use one index at a time: MSI-X when the guest has it on, else MSI when it has
that on, else INTx. (QEMU goes from MSI-X straight back to INTx; a guest with both on breaks the
specification anyway.) When the kernel cannot give MSI all the vectors the guest enabled, it
answers how many it can and MSI is retried with that many, as QEMU does; MSI-X gets as many
vectors as VFIO offers (the capability the guest sees says so).
"""

from __future__ import annotations

import enum
import errno
import logging
import select
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING

from pyvmm.kvm.eventfd import EventFd
from pyvmm.machine.threads import start_thread
from pyvmm.uapi import vfio as uapi
from pyvmm.uapi.ioctl import IoctlError

if TYPE_CHECKING:
    from pyvmm.kvm.vm import Vm
    from pyvmm.vfio.device import VfioDevice

log = logging.getLogger(__name__)


class IrqMode(enum.Enum):
    NONE = "none"
    INTX = "intx"
    MSI = "msi"
    MSIX = "msix"


class VfioInterrupts:
    """The interrupt index a VFIO device uses, switched as the guest enables MSI or MSI-X."""

    def __init__(self, vm: Vm, device: VfioDevice) -> None:
        self._vm = vm
        self._device = device
        self._lock = threading.Lock()
        self._stack = ExitStack()
        self.mode = IrqMode.NONE
        self._fds: list[int] = []  # what the device signals on in `mode`
        self._msi: list[int] = []  # the eventfds of the MSI vectors enabled, MSI-X's if on
        self._msix: list[int] = []
        self._intx: tuple[EventFd, EventFd] | None = None  # trigger, resample
        self._intx_gsi = 0
        self._intx_irqfd = False  # the trigger is a KVM irqfd now (only while in INTx)
        self._unmask_thread: threading.Thread | None = None
        self._stopping = self._stack.enter_context(EventFd())

    # INTx

    def wire_intx(self, gsi: int) -> None:
        """Give the device's INTx to `gsi` (an IOAPIC input, level-triggered through KVM's
        resampling irqfd) and start on it."""
        trigger = self._stack.enter_context(EventFd())
        resample = self._stack.enter_context(EventFd())
        self._intx = (trigger, resample)
        self._intx_gsi = gsi
        with self._lock:
            self._follow()

    def _enable_intx(self) -> None:
        assert self._intx is not None
        trigger, resample = self._intx
        self._vm.irqfd(trigger.fd, self._intx_gsi, resamplefd=resample.fd)
        self._intx_irqfd = True
        self._device.set_irq_eventfds(uapi.VfioPciIrq.INTX, [trigger.fd])
        try:
            self._device.set_irq_unmask_eventfd(uapi.VfioPciIrq.INTX, resample.fd)
        except IoctlError as err:
            if self._unmask_thread is None:
                log.warning(
                    "%s: VFIO refuses to unmask INTx by eventfd (%s); pyvmm unmasks it from "
                    "Python at each EOI instead",
                    self._device.name,
                    err,
                )
                self._unmask_thread = start_thread(self._unmask_on_eoi, f"{self._device.name}-intx")

    def _unmask_on_eoi(self) -> None:
        assert self._intx is not None
        resample = self._intx[1]
        poller = select.poll()
        poller.register(resample.fd, select.POLLIN)
        poller.register(self._stopping.fd, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stopping.fd in ready:
                return
            resample.read()
            with self._lock:
                if self.mode is not IrqMode.INTX:
                    continue
                try:
                    self._device.unmask_irq(uapi.VfioPciIrq.INTX)
                except IoctlError as err:
                    log.warning("%s: unmasking INTx failed: %s", self._device.name, err)

    # MSI and MSI-X: what the guest enabled decides the index (MSI-X over MSI over INTx)

    def msi(self, eventfds: Sequence[EventFd], vectors: int) -> None:
        """The guest enabled `vectors` MSI vectors (0: MSI is off)."""
        with self._lock:
            self._msi = [fd.fd for fd in eventfds[:vectors]]
            self._follow()

    def msix(self, eventfds: Sequence[EventFd], enabled: bool) -> None:
        """The guest turned MSI-X on or off."""
        with self._lock:
            self._msix = [fd.fd for fd in eventfds] if enabled else []
            self._follow()

    def _follow(self) -> None:
        if self._msix:
            wanted, fds = IrqMode.MSIX, self._msix
        elif self._msi:
            wanted, fds = IrqMode.MSI, self._msi
        else:
            wanted, fds = (IrqMode.INTX if self._intx else IrqMode.NONE), []
        if (wanted, fds) != (self.mode, self._fds):
            self._switch(wanted, fds)

    _INDEX = {
        IrqMode.INTX: uapi.VfioPciIrq.INTX,
        IrqMode.MSI: uapi.VfioPciIrq.MSI,
        IrqMode.MSIX: uapi.VfioPciIrq.MSIX,
    }

    def _switch(self, mode: IrqMode, fds: list[int]) -> None:
        """Leave the current index, take `mode` (called with the lock held). A device that
        refuses is logged and left with no interrupts: the guest's doing, not pyvmm's."""
        self._leave()
        try:
            if mode is IrqMode.INTX:
                self._enable_intx()
            elif mode is not IrqMode.NONE:
                granted = self._device.set_irq_eventfds(self._INDEX[mode], fds)
                if granted and mode is IrqMode.MSI:  # the host has fewer vectors: take those
                    log.warning(
                        "%s: the host gives MSI %d of the %d vectors the guest enabled",
                        self._device.name,
                        granted,
                        len(fds),
                    )
                    fds = fds[:granted]
                    granted = self._device.set_irq_eventfds(self._INDEX[mode], fds)
                if granted:
                    raise IoctlError("VFIO_DEVICE_SET_IRQS", errno.ENOSPC)
        except IoctlError as err:
            log.warning("%s: %s cannot be turned on: %s", self._device.name, mode.value, err)
            self._leave()
            return
        self.mode, self._fds = mode, fds

    def _leave(self) -> None:
        """Turn the current index off (and INTx's irqfd, so KVM drops the line)."""
        if self.mode is not IrqMode.NONE:
            try:
                self._device.disable_irqs(self._INDEX[self.mode])
            except IoctlError as err:
                log.warning(
                    "%s: turning %s off failed: %s", self._device.name, self.mode.value, err
                )
        if self._intx_irqfd:
            assert self._intx is not None
            self._vm.irqfd_remove(self._intx[0].fd, self._intx_gsi)
            self._intx_irqfd = False
        self.mode, self._fds = IrqMode.NONE, []

    def close(self) -> None:
        with self._lock:
            self._leave()
        self._stopping.signal()
        if self._unmask_thread is not None:
            self._unmask_thread.join()
        self._stack.close()
