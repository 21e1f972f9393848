"""virtio over PCI, the modern (virtio 1.x, non-transitional) transport (virtio 1.2 §4.1).

One PCI function per device: vendor 0x1AF4, device 0x1040 + the virtio device ID, and a single
64-bit memory BAR (BAR 0) holding, a page each, the common configuration, the ISR byte, the
device configuration, the queue notification doorbells and the MSI-X table and PBA. Vendor
capabilities (common, notify, ISR, device, PCI-config access) point the driver at them.

The hot paths never run on a vCPU thread:

- Notify: when the driver enables a queue, its doorbell address (BAR 0 + 0x3000 + 4 * queue) gets
  a KVM ioeventfd, so the driver's 16-bit write completes in the kernel and only wakes this
  device's worker thread. (A write KVM does not match, e.g. of another width, exits to Python and
  signals the same eventfd.)
- Interrupt: after processing, the worker raises the queue's MSI-X vector, which is one eventfd
  write into a KVM irqfd (see pyvmm.devices.pci.msix).

The worker thread (one per device) polls the queue eventfds, a wake-up eventfd and whatever the
backend waits on (a tap). vCPU-side register accesses and the worker share `_lock`, so a reset
or a queue change never happens in the middle of processing. `pause()` parks the worker between
two rounds of processing, so every request it took is completed (its used element written and
its interrupt raised) before pause returns; doorbells rung meanwhile wait in their eventfds and
are served after `resume()`. The worker stops when the device is closed (with its bus).
"""

from __future__ import annotations

import logging
import select
import struct
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pyvmm.devices.pci.capability import PCI_CAP_ID_VNDR, Capability
from pyvmm.devices.pci.device import (
    NUM_BARS,
    PCI_BASE_ADDRESS_0,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    Bar,
    BarKind,
    PciFunction,
    PciFunctionState,
)
from pyvmm.devices.pci.msix import Msix, MsixState
from pyvmm.devices.virtio.backend import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioBackend,
)
from pyvmm.devices.virtio.queue import NO_VECTOR, QueueState, Virtqueue, VirtqueueError
from pyvmm.kvm.eventfd import EventFd
from pyvmm.machine.memory import GuestMemoryError
from pyvmm.machine.state import StateError
from pyvmm.machine.threads import start_thread

if TYPE_CHECKING:
    from pyvmm.machine.machine import Machine

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_DEVICE_BASE = 0x1040
VIRTIO_PCI_SUBSYSTEM = 0x1100  # "SHOULD be 0x40 or higher" for non-transitional devices

# virtio_pci_cap.cfg_type
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# device_status
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40

ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

# BAR 0 layout
BAR_INDEX = 0
BAR_SIZE = 0x8000
COMMON_OFFSET = 0x0000
COMMON_SIZE = 0x3C  # through queue_reset
ISR_OFFSET = 0x1000
ISR_SIZE = 4
DEVICE_OFFSET = 0x2000
DEVICE_MAX = 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_MULTIPLIER = 4
NOTIFY_WIDTH = 2  # the driver writes the 16-bit queue index
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x6000
MAX_QUEUES = (MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) // 16 - 1  # one vector each + config

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


def _virtio_cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> Capability:
    """A read-only struct virtio_pci_cap (plus `extra` trailing bytes) pointing into BAR 0."""
    cap_len = 16 + len(extra)
    body = struct.pack("<BBBBxxII", cap_len, cfg_type, BAR_INDEX, 0, offset, length) + extra
    return Capability(PCI_CAP_ID_VNDR, body)


class PciCfgCapability(Capability):
    """VIRTIO_PCI_CAP_PCI_CFG: a window into the BARs through config space (§4.1.4.9), for
    drivers that cannot map BARs yet. The driver sets bar/offset/length; reading or writing
    pci_cfg_data then accesses the BAR there."""

    BAR, OFFSET, LENGTH, DATA = 4, 8, 12, 16

    def __init__(self, function: VirtioPciDevice) -> None:
        body = struct.pack("<BBBBxxIII", 20, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, 0, 0)
        wmask = struct.pack("<BBBBxxIII", 0, 0, 0xFF, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
        super().__init__(PCI_CAP_ID_VNDR, body, wmask)
        self._function = function

    def _target(self) -> tuple[int, int, int] | None:
        bar, offset, length = (
            self.get(self.BAR, 1),
            self.get(self.OFFSET, 4),
            self.get(self.LENGTH, 4),
        )
        if length not in (1, 2, 4) or offset % length or offset + length > BAR_SIZE:
            return None
        return bar, offset, length

    def _touches_data(self, offset: int, size: int) -> bool:
        return offset + size > self.DATA

    def before_read(self, offset: int, size: int) -> None:
        target = self._target()
        if target is not None and self._touches_data(offset, size):
            self.put(self.DATA, target[2], self._function.bar_read(*target))

    def after_write(self, offset: int, size: int) -> None:
        target = self._target()
        if target is not None and self._touches_data(offset, size):
            self._function.bar_write(*target, self.get(self.DATA, target[2]))


@dataclass
class VirtioPciState:
    """The transport's state for snapshots (the backend's own state is its file or tap)."""

    VERSION: ClassVar[int] = 1

    function: PciFunctionState
    status: int
    device_feature_select: int
    driver_feature_select: int
    driver_features: int
    config_msix_vector: int
    queue_select: int
    isr: int
    queues: list[QueueState]
    msix: MsixState


class VirtioPciDevice(PciFunction):
    """A virtio device (`backend`) on PCI: `machine.add_device("virtio-rng")` and the like
    make one (recorded in the machine's configuration), or
    `machine.pci.plug(VirtioPciDevice(machine, backend))` for a backend of your own (not
    recorded: a machine built from the configuration lacks it). It stops its worker when its
    bus closes it."""

    state_type: ClassVar[type] = VirtioPciState

    def __init__(self, machine: Machine, backend: VirtioBackend) -> None:
        nqueues = len(backend.queue_sizes)
        if not 1 <= nqueues <= MAX_QUEUES:
            raise ValueError(f"{backend.name}: {nqueues} queues (1 to {MAX_QUEUES} supported)")
        if len(backend.config()) > DEVICE_MAX:
            raise ValueError(f"{backend.name}: device configuration larger than {DEVICE_MAX}")
        super().__init__(
            VIRTIO_PCI_VENDOR,
            VIRTIO_PCI_DEVICE_BASE + backend.device_type,
            backend.class_code,
            revision=1,
            bars=(Bar(BAR_INDEX, BarKind.MEM64, BAR_SIZE),),
            subsystem_vendor_id=VIRTIO_PCI_VENDOR,
            subsystem_id=VIRTIO_PCI_SUBSYSTEM,
            name=backend.name,
        )
        self.backend = backend
        self.offered_features = (
            backend.features | VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC
        )
        self.queues = [Virtqueue(machine.dma, size) for size in backend.queue_sizes]
        self._vm = machine.vm
        self._lock = threading.Lock()
        self._stack = ExitStack()
        try:
            self.msix = Msix(
                machine.vm,
                machine.gsi,
                nqueues + 1,
                table=(BAR_INDEX, MSIX_TABLE_OFFSET),
                pba=(BAR_INDEX, MSIX_PBA_OFFSET),
            )
            self._stack.callback(self.msix.close)
            self._notify = [self._stack.enter_context(EventFd()) for _ in range(nqueues)]
            self._wake = self._stack.enter_context(EventFd())
        except BaseException:
            self._stack.close()
            raise
        self._stack.callback(backend.close)
        self._ioeventfds: dict[int, int] = {}  # queue -> registered doorbell address
        self._park = threading.Condition()
        self._pausing = False
        self._parked = False
        self._stopping = False
        self._reset_registers()
        self._add_capabilities()
        self._worker = start_thread(self._work, f"{backend.name}-worker")

    def chosen_options(self) -> dict[str, Any]:
        return self.backend.chosen_options()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = NO_VECTOR
        self.queue_select = 0
        self.isr = 0

    def _add_capabilities(self) -> None:
        self.add_capability(_virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE))
        self.add_capability(_virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE))
        config_len = len(self.backend.config())
        if config_len:
            self.add_capability(_virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, config_len))
        self.add_capability(
            _virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_MULTIPLIER * len(self.queues),
                struct.pack("<I", NOTIFY_MULTIPLIER),
            )
        )
        self.add_capability(PciCfgCapability(self))
        self.add_capability(self.msix.capability)

    # BAR 0

    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index != BAR_INDEX:
            return (1 << (8 * size)) - 1
        if offset + size <= COMMON_SIZE:
            with self._lock:
                data = self._common_bytes()
            return int.from_bytes(data[offset : offset + size], "little")
        if offset == ISR_OFFSET:
            with self._lock:
                value, self.isr = self.isr, 0  # reading acknowledges (INTx semantics)
            return value
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_MAX:
            data = self.backend.config()
            start = offset - DEVICE_OFFSET
            return int.from_bytes(data[start : start + size].ljust(size, b"\0"), "little")
        if MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
            return self.msix.table_read(offset - MSIX_TABLE_OFFSET, size)
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + self.msix.pba_size:
            return self.msix.pba_read(offset - MSIX_PBA_OFFSET, size)
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index != BAR_INDEX:
            return
        if offset + size <= COMMON_SIZE:
            with self._lock:
                self._common_write(offset, size, value)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * len(self.queues):
            # Only reached when KVM's ioeventfd did not take the write.
            self._notify[(offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER].signal()
        elif MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
            self.msix.table_write(offset - MSIX_TABLE_OFFSET, size, value)

    # common configuration (called with _lock held)

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

    def _common_write(self, offset: int, size: int, value: int) -> None:
        merged = bytearray(self._common_bytes())
        merged[offset : offset + size] = value.to_bytes(size, "little")
        for field_offset, field_size, name in _COMMON_FIELDS:
            if field_offset < offset + size and offset < field_offset + field_size:
                new = int.from_bytes(merged[field_offset : field_offset + field_size], "little")
                self._set_field(name, new)

    def _valid_vector(self, vector: int) -> int:
        """The vector, or NO_VECTOR if the table has no such entry (the driver reads back
        NO_VECTOR to learn that the mapping failed)."""
        return vector if vector < self.msix.vectors else NO_VECTOR

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
                self._enable_queue(self.queue_select)
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
            self._reset()
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
            self.backend.activate(self.driver_features, self.queues)
            self._kick_all()

    def _features_acceptable(self) -> bool:
        features = self.driver_features
        return bool(features & VIRTIO_F_VERSION_1) and not features & ~self.offered_features

    def _apply_ring_features(self, queue: Virtqueue) -> None:
        queue.event_idx = bool(self.driver_features & VIRTIO_F_EVENT_IDX)
        queue.indirect = bool(self.driver_features & VIRTIO_F_INDIRECT_DESC)

    def _enable_queue(self, index: int) -> None:
        queue = self.queues[index]
        self._apply_ring_features(queue)
        try:
            queue.activate()
        except VirtqueueError as err:
            self._fail(index, err)
            return
        self._sync_ioeventfds()
        self._notify[index].signal()  # buffers may already be waiting

    def _reset(self) -> None:
        for queue in self.queues:
            queue.reset()
        self._sync_ioeventfds()
        for eventfd in self._notify:
            eventfd.read()
        self.backend.reset()
        self._reset_registers()

    def _fail(self, index: int, err: Exception) -> None:
        """A queue is unusable: stop using it and tell the driver to reset the device."""
        log.warning("%s: queue %d: %s; the device needs a reset", self.name, index, err)
        self.queues[index].broken = True
        if not self.status & STATUS_DEVICE_NEEDS_RESET:
            self.status |= STATUS_DEVICE_NEEDS_RESET
            self.isr |= ISR_CONFIG
            if self.config_msix_vector != NO_VECTOR:
                self.msix.signal(self.config_msix_vector)

    # doorbells

    def config_write(self, offset: int, size: int, value: int) -> None:
        master = self.command & PCI_COMMAND_MASTER
        super().config_write(offset, size, value)
        if offset < PCI_BASE_ADDRESS_0 + 4 * NUM_BARS and offset + size > PCI_COMMAND:
            with self._lock:
                self._sync_ioeventfds()
                if self.command & PCI_COMMAND_MASTER and not master:
                    self._kick_all()

    def _doorbell(self, index: int) -> int | None:
        bar = self.bars[BAR_INDEX]
        base = self.bar_address(BAR_INDEX)
        if not base or not self.decodes(bar) or not self.queues[index].ready:
            return None
        return base + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * index

    def _sync_ioeventfds(self) -> None:
        """Keep one ioeventfd per enabled queue on its doorbell where the BAR is now."""
        for index, eventfd in enumerate(self._notify):
            want, have = self._doorbell(index), self._ioeventfds.get(index)
            if want == have:
                continue
            if have is not None:
                del self._ioeventfds[index]
                try:
                    self._vm.ioeventfd_remove(eventfd.fd, have, NOTIFY_WIDTH)
                except OSError as err:
                    log.warning("%s: removing queue %d's ioeventfd: %s", self.name, index, err)
            if want is not None:
                try:
                    self._vm.ioeventfd(eventfd.fd, want, NOTIFY_WIDTH)
                except OSError as err:  # notifications still work, through a Python exit
                    log.warning("%s: no ioeventfd for queue %d: %s", self.name, index, err)
                else:
                    self._ioeventfds[index] = want

    def _kick_all(self) -> None:
        for index, queue in enumerate(self.queues):
            if queue.ready:
                self._notify[index].signal()

    # the worker thread

    def _running(self) -> bool:
        return bool(self.status & STATUS_DRIVER_OK and self.command & PCI_COMMAND_MASTER)

    def _work(self) -> None:
        poller = select.poll()
        queue_of = {eventfd.fd: index for index, eventfd in enumerate(self._notify)}
        for fd in (self._wake.fd, *queue_of):
            poller.register(fd, select.POLLIN)
        watched: set[int] = set()
        while True:
            try:
                with self._lock:
                    wanted = self.backend.input_fds() if self._running() else {}
                for fd in watched - wanted.keys():
                    poller.unregister(fd)
                for fd in wanted.keys() - watched:
                    poller.register(fd, select.POLLIN)
                watched = set(wanted)
                ready = [fd for fd, _ in poller.poll()]
                if self._wake.fd in ready:
                    self._wake.read()
                    if not self._park_while_paused():
                        return
                    continue  # poll again: what is ready was not taken
                with self._lock:
                    for fd in ready:
                        index = queue_of.get(fd)
                        if index is not None:
                            self._notify[index].read()
                            self._guarded(index, self.backend.process, index)
                        elif fd in wanted:
                            self._guarded(wanted[fd], self.backend.input_ready, fd)
                    self._raise_used_interrupts()
            except Exception as err:  # a pyvmm bug: the device stops, the worker does not
                log.exception("%s: worker failed", self.name)
                with self._lock:
                    for index in range(len(self.queues)):
                        self._fail(index, err)

    def _park_while_paused(self) -> bool:
        """Wait here, between requests, while paused; False when the worker is to stop."""
        with self._park:
            while self._pausing and not self._stopping:
                self._parked = True
                self._park.notify_all()
                self._park.wait()
            self._parked = False
            return not self._stopping

    # pause (the component protocol)

    def pause(self) -> None:
        """Return once the worker is parked with no request half done (or a resume() came
        first)."""
        if threading.current_thread() is self._worker:
            raise RuntimeError(f"{self.name}: pause() on its own worker would wait for itself")
        with self._park:
            self._pausing = True
        self._wake.signal()
        with self._park:
            while self._pausing and not self._parked and self._worker.is_alive():
                self._park.wait(0.1)
        self.backend.pause()

    def resume(self) -> None:
        self.backend.resume()
        with self._park:
            self._pausing = False
            self._park.notify_all()

    def _guarded(self, index: int, work: Callable[[int], None], arg: int) -> None:
        """Run backend work that feeds queue `index`, if it may run; a bad ring (or a backend
        bug the guest provoked) breaks that queue instead of the worker."""
        queue = self.queues[index]
        if not self._running() or not queue.ready or queue.broken:
            return
        try:
            work(arg)
        except (VirtqueueError, GuestMemoryError) as err:
            self._fail(index, err)
        except Exception as err:
            log.exception("%s: queue %d processing failed", self.name, index)
            self._fail(index, err)

    def _raise_used_interrupts(self) -> None:
        for queue in self.queues:
            if not queue.broken and queue.needs_interrupt():
                self.isr |= ISR_QUEUE
                if queue.msix_vector != NO_VECTOR:
                    self.msix.signal(queue.msix_vector)

    # state

    def save(self) -> VirtioPciState:
        with self._lock:
            return VirtioPciState(
                function=super().save(),
                status=self.status,
                device_feature_select=self.device_feature_select,
                driver_feature_select=self.driver_feature_select,
                driver_features=self.driver_features,
                config_msix_vector=self.config_msix_vector,
                queue_select=self.queue_select,
                isr=self.isr,
                queues=[queue.save() for queue in self.queues],
                msix=self.msix.save(),
            )

    def check(self, state: VirtioPciState) -> None:
        self.check_config(state.function)
        if len(state.queues) != len(self.queues):
            raise StateError(
                f"{self.name}: saved with {len(state.queues)} queues, this device has "
                f"{len(self.queues)}"
            )
        if len(state.msix.table) != self.msix.table_size:
            raise StateError(f"{self.name}: saved MSI-X table is of another size")
        if any(not 0 <= vector < self.msix.vectors for vector in state.msix.pending):
            raise StateError(f"{self.name}: saved MSI-X pending vectors {state.msix.pending}")
        for index, (queue, saved) in enumerate(zip(self.queues, state.queues, strict=True)):
            size = saved.size
            if not 1 <= size <= queue.max_size or size & (size - 1):
                raise StateError(f"{self.name}: queue {index} saved with size {size}")
            if saved.msix_vector != NO_VECTOR and saved.msix_vector >= self.msix.vectors:
                raise StateError(
                    f"{self.name}: queue {index} saved with vector {saved.msix_vector}"
                )

    def restore(self, state: VirtioPciState) -> None:
        """Bring the device back as saved (the machine is paused, the backend is the same)."""
        self.check(state)
        self.restore_config(state.function)  # config space, and the BARs where it puts them
        with self._lock:
            for name in (
                "status",
                "device_feature_select",
                "driver_feature_select",
                "driver_features",
                "config_msix_vector",
                "queue_select",
                "isr",
            ):
                setattr(self, name, getattr(state, name))
            for queue, queue_state in zip(self.queues, state.queues, strict=True):
                queue.restore(queue_state)
        self.msix.restore(state.msix)
        with self._lock:
            self._sync_ioeventfds()
            if self.status & STATUS_DRIVER_OK:
                self.backend.activate(self.driver_features, self.queues)
                self._kick_all()

    # teardown

    def close(self) -> None:
        """Stop the worker, remove the doorbells and irqfds, unmap the BAR, release the
        backend."""
        if self._worker.is_alive():
            with self._park:
                self._stopping = True
                self._park.notify_all()
            self._wake.signal()
            self._worker.join()
        with self._lock:
            for queue in self.queues:
                queue.ready = False
            self._sync_ioeventfds()
        super().close()
        self._stack.close()
