"""The virtio-pci common configuration (struct virtio_pci_common_cfg, virtio 1.2 §4.1.4.3):
the register block at the start of BAR 0 through which the driver negotiates features, sets the
device status and sets up each queue.

`CommonConfig` holds these registers and decodes the driver's reads and writes of any width.
What a write sets off beyond them (enabling a queue, resetting the device, starting it at
DRIVER_OK) is the transport's (pyvmm.devices.virtio.pci), through the callbacks it gives; the
transport calls in with its lock held.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import ClassVar

from pyvmm.devices.virtio.backend import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from pyvmm.devices.virtio.queue import NO_VECTOR, Virtqueue

log = logging.getLogger(__name__)

# device_status
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40

COMMON_SIZE = 0x3C  # through queue_reset

# struct virtio_pci_common_cfg, in order: one format for the whole block, and each field's
# (offset, size, name) for decoding writes of any width.
_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQHH")
_COMMON_FIELDS = (
    (0x00, 4, "device_feature_select"),
    (0x04, 4, "device_feature"),
    (0x08, 4, "driver_feature_select"),
    (0x0C, 4, "driver_feature"),
    (0x10, 2, "config_msix_vector"),
    (0x12, 2, "num_queues"),
    (0x14, 1, "device_status"),
    (0x15, 1, "config_generation"),
    (0x16, 2, "queue_select"),
    (0x18, 2, "queue_size"),
    (0x1A, 2, "queue_msix_vector"),
    (0x1C, 2, "queue_enable"),
    (0x1E, 2, "queue_notify_off"),
    (0x20, 8, "queue_desc"),
    (0x28, 8, "queue_driver"),
    (0x30, 8, "queue_device"),
    (0x38, 2, "queue_notif_config_data"),
    (0x3A, 2, "queue_reset"),
)
assert _COMMON.size == COMMON_SIZE


class CommonConfig:
    """The common configuration of a device with `queues`, offering `device_features` (and
    the ring features pyvmm implements) and `vectors` MSI-X vectors. The transport is told
    through `reset` when the driver resets the device (these registers reset themselves
    after it), through `enable_queue` when the driver enables a queue (its ring features
    applied), and through `driver_ok` when the driver sets DRIVER_OK."""

    # the registers (all but the selected queue's, which are its own) that a snapshot holds:
    # the transport's state has a field of each name
    REGISTERS: ClassVar[tuple[str, ...]] = (
        "status",
        "device_feature_select",
        "driver_feature_select",
        "driver_features",
        "config_msix_vector",
        "queue_select",
    )

    def __init__(
        self,
        name: str,
        queues: list[Virtqueue],
        device_features: int,
        vectors: int,
        *,
        reset: Callable[[], None],
        enable_queue: Callable[[int], None],
        driver_ok: Callable[[], None],
    ) -> None:
        self.name = name
        self.queues = queues
        self.offered_features = (
            device_features | VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC
        )
        self._vectors = vectors
        self._on_reset = reset
        self._on_enable_queue = enable_queue
        self._on_driver_ok = driver_ok
        self.reset()

    def reset(self) -> None:
        """The registers as at power-on."""
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = NO_VECTOR
        self.queue_select = 0

    def read(self, offset: int, size: int) -> int:
        data = self._common_bytes()
        return int.from_bytes(data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        merged = bytearray(self._common_bytes())
        merged[offset : offset + size] = value.to_bytes(size, "little")
        for field_offset, field_size, name in _COMMON_FIELDS:
            if field_offset < offset + size and offset < field_offset + field_size:
                new = int.from_bytes(merged[field_offset : field_offset + field_size], "little")
                self._set_field(name, new)

    def _selected(self) -> Virtqueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _common_bytes(self) -> bytes:
        queue = self._selected()
        select = self.device_feature_select
        return _COMMON.pack(
            self.device_feature_select,
            (self.offered_features >> (32 * select)) & 0xFFFFFFFF if select < 2 else 0,
            self.driver_feature_select,
            (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
            if self.driver_feature_select < 2
            else 0,
            self.config_msix_vector,
            len(self.queues),
            self.status,
            0,  # config_generation: no backend changes its configuration at run time
            self.queue_select,
            queue.size if queue else 0,
            queue.msix_vector if queue else NO_VECTOR,
            int(queue.ready) if queue else 0,
            self.queue_select if queue else 0,
            queue.desc if queue else 0,
            queue.driver if queue else 0,
            queue.device if queue else 0,
            0,
            0,
        )

    def _valid_vector(self, vector: int) -> int:
        """The vector, or NO_VECTOR if the table has no such entry (the driver reads back
        NO_VECTOR to learn that the mapping failed)."""
        return vector if vector < self._vectors else NO_VECTOR

    def _set_field(self, name: str, value: int) -> None:
        queue = self._selected()
        if name == "device_feature_select":
            self.device_feature_select = value
        elif name == "driver_feature_select":
            self.driver_feature_select = value
        elif name == "driver_feature":
            if self.status & STATUS_FEATURES_OK or self.driver_feature_select > 1:
                return
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (
                value << shift
            )
        elif name == "config_msix_vector":
            self.config_msix_vector = self._valid_vector(value)
        elif name == "device_status":
            self._set_status(value)
        elif name == "queue_select":
            self.queue_select = value
        elif queue is None:
            return
        elif name == "queue_msix_vector":
            queue.msix_vector = self._valid_vector(value)
        elif name == "queue_enable":
            if value == 1 and not queue.ready and not queue.broken:
                self._apply_ring_features(queue)
                self._on_enable_queue(self.queue_select)
        elif queue.ready:
            return  # the rest of a queue's set-up is fixed once it is enabled
        elif name == "queue_size":
            queue.size = value
        elif name == "queue_desc":
            queue.desc = value
        elif name == "queue_driver":
            queue.driver = value
        elif name == "queue_device":
            queue.device = value

    def _set_status(self, value: int) -> None:
        if value == 0:
            self._on_reset()
            self.reset()
            return
        old = self.status
        new = old | (value & ~STATUS_DEVICE_NEEDS_RESET)  # the driver never clears bits
        if new & ~old & STATUS_FEATURES_OK and not self._features_acceptable():
            log.info("%s: refusing driver features %#x", self.name, self.driver_features)
            new &= ~STATUS_FEATURES_OK
        if new & ~old & STATUS_DRIVER_OK and not new & STATUS_FEATURES_OK:
            log.info("%s: DRIVER_OK without FEATURES_OK ignored", self.name)
            new &= ~STATUS_DRIVER_OK
        self.status = new
        if new & ~old & STATUS_DRIVER_OK:
            for queue in self.queues:
                self._apply_ring_features(queue)
            self._on_driver_ok()

    def _features_acceptable(self) -> bool:
        features = self.driver_features
        return bool(features & VIRTIO_F_VERSION_1) and not features & ~self.offered_features

    def _apply_ring_features(self, queue: Virtqueue) -> None:
        queue.event_idx = bool(self.driver_features & VIRTIO_F_EVENT_IDX)
        queue.indirect = bool(self.driver_features & VIRTIO_F_INDIRECT_DESC)
