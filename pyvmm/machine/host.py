"""What a device is given of the machine it is plugged into.

A device or a passed-through function is built with the machine's VM (its irqfds and
ioeventfds), its GSI routing (the MSI routes of its vectors) and the DMA view of its RAM, and
with nothing else of it: `DeviceHost` names these three. The board's Machine is one; a test can
give any object that has them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pyvmm.kvm.irq import GsiRouting
    from pyvmm.kvm.vm import Vm
    from pyvmm.machine.dma import DmaView


class DeviceHost(Protocol):
    @property
    def vm(self) -> Vm: ...

    @property
    def gsi(self) -> GsiRouting: ...

    @property
    def dma(self) -> DmaView: ...
