"""virtio-rng (virtio 1.2 §5.4): one request queue; each chain's writable buffers are filled
with entropy from the host (os.urandom, i.e. getrandom(2))."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pyvmm.devices.virtio.backend import VIRTIO_ID_RNG, VirtioBackend
from pyvmm.devices.virtio.pci import VirtioPciDevice

if TYPE_CHECKING:
    from pyvmm.machine.host import DeviceHost

QUEUE_SIZE = 256
# Bytes given per request at most: the spec lets the device fill less than offered, and a guest
# offering gigabytes should not make the host generate them.
MAX_REQUEST = 64 * 1024


class VirtioRng(VirtioBackend):
    device_type = VIRTIO_ID_RNG
    name = "virtio-rng"
    queue_sizes = (QUEUE_SIZE,)

    def process(self, index: int) -> None:
        queue = self.queues[index]
        while (chain := queue.pop()) is not None:
            length = min(chain.writable_len, MAX_REQUEST)
            written = chain.write(0, os.urandom(length))
            queue.push(chain, written)


def create(machine: DeviceHost) -> VirtioPciDevice:
    """A virtio-rng PCI function (device kind "virtio-rng")."""
    return VirtioPciDevice(machine, VirtioRng())
