"""What a virtio device type is, independent of the transport: its ID, queues, feature bits,
configuration space and how it processes buffers (virtio 1.2 §2, §5).

A backend never sees PCI. The transport (pyvmm.devices.virtio.pci) negotiates features, sets up
the queues, calls `activate` when the driver sets DRIVER_OK, and then calls `process` on its
worker thread whenever a queue is notified. After each call it raises the interrupts the rings
ask for, so a backend only pops chains and pushes them back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pyvmm.devices.virtio.queue import Virtqueue

log = logging.getLogger(__name__)

# Device IDs (§5)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_RNG = 4

# Transport-independent feature bits (§6)
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32


class VirtioBackend:
    """Base class of a device type. Subclasses set the class attributes and override
    `process`; the rest has sensible defaults."""

    device_type: int = 0
    name: str = "virtio"
    class_code: int = 0xFF0000  # PCI class: "other"
    queue_sizes: tuple[int, ...] = ()  # the maximum size of each queue
    features: int = 0  # device-specific feature bits offered

    def __init__(self) -> None:
        self.queues: list[Virtqueue] = []
        self.driver_features = 0
        #: Set by the transport: the backend calls it, saying why, when it can no longer work
        #: as the driver set it up (the host refused a step); the driver is told to reset it
        #: (DEVICE_NEEDS_RESET).
        self.needs_reset: Callable[[str], None] = _no_transport

    def config(self) -> bytes:
        """The device-specific configuration space, read-only by default."""
        return b""

    def config_write(self, offset: int, size: int, value: int) -> None:
        """The driver wrote `size` bytes at `offset` of the configuration space (ignored by
        default: most fields are the device's to set)."""

    def chosen_options(self) -> dict[str, Any]:
        """Options the backend chose itself (see PciFunction.chosen_options)."""
        return {}

    def activate(self, features: int, queues: list[Virtqueue]) -> None:
        """The driver set DRIVER_OK: `features` were negotiated and `queues` configured."""
        self.driver_features = features
        self.queues = queues

    def process(self, index: int) -> None:
        """Queue `index` was notified: pop and push chains (worker thread)."""
        raise NotImplementedError

    def input_fds(self) -> dict[int, int]:
        """File descriptors the worker should also wait on right now (until readable), each
        mapped to the index of the queue its input goes to."""
        return {}

    def input_ready(self, fd: int) -> None:
        """One of `input_fds()` became readable (worker thread)."""

    def pause(self) -> None:
        """The machine pauses (the worker is parked): stop taking host input meant for it."""

    def resume(self) -> None:
        """The machine runs on: take host input again."""

    def reset(self) -> None:
        """The driver reset the device: forget everything negotiated."""
        self.driver_features = 0
        self.queues = []

    def close(self) -> None:
        """Release host resources (files, taps)."""


def _no_transport(why: str) -> None:
    """(A backend driven without a transport, as in a unit test: there is no driver to tell.)"""
    log.warning("a virtio device on no transport needs a reset: %s", why)
