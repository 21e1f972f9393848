"""virtio over PCI, the modern (virtio 1.x, non-transitional) transport (virtio 1.2 §4.1).

One PCI function per device: vendor 0x1AF4, device 0x1040 + the virtio device ID, and a single
64-bit memory BAR (BAR 0) holding, a page each, the common configuration, the ISR byte, the
device configuration, the queue notification doorbells and the MSI-X table and PBA. Vendor
capabilities (common, notify, ISR, device, PCI-config access) point the driver at them (all of
which pyvmm.devices.virtio.pci_layout places); the common configuration's registers are
pyvmm.devices.virtio.pci_common's.

The hot paths never run on a vCPU thread:

- Notify: when the driver enables a queue, its doorbell address (BAR 0 + 0x3000 + 4 * queue) gets
  a KVM ioeventfd, so the driver's 16-bit write completes in the kernel and only wakes this
  device's worker thread. (A write KVM does not match, e.g. of another width, exits to Python and
  signals the same eventfd.)
- Interrupt: after processing, the worker raises the queue's MSI-X vector, which is one eventfd
  write into a KVM irqfd (see pyvmm.devices.pci.msix).

The worker thread (one per device, pyvmm.devices.virtio.worker) polls the queue eventfds, a
wake-up eventfd and whatever the backend waits on (a tap). vCPU-side register accesses and the
worker share `_lock`, so a reset or a queue change never happens in the middle of processing.
`pause()` parks the worker between two rounds of processing, so every request it took is
completed (its used element written and its interrupt raised) before pause returns; doorbells
rung meanwhile wait in their eventfds and are served after `resume()`. The worker stops when the
device is closed (with its bus).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

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
from pyvmm.devices.virtio.backend import VirtioBackend
from pyvmm.devices.virtio.pci_common import (
    COMMON_SIZE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    CommonConfig,
)
from pyvmm.devices.virtio.pci_layout import (
    BAR_INDEX,
    BAR_SIZE,
    DEVICE_MAX,
    DEVICE_OFFSET,
    ISR_OFFSET,
    MAX_QUEUES,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    NOTIFY_MULTIPLIER,
    NOTIFY_OFFSET,
    NOTIFY_WIDTH,
    virtio_capabilities,
)
from pyvmm.devices.virtio.queue import NO_VECTOR, QueueState, Virtqueue, VirtqueueError
from pyvmm.devices.virtio.worker import QueueWorker
from pyvmm.kvm.eventfd import EventFd
from pyvmm.machine.memory import GuestMemoryError
from pyvmm.machine.state import StateError

if TYPE_CHECKING:
    from pyvmm.machine.host import DeviceHost

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_DEVICE_BASE = 0x1040
VIRTIO_PCI_SUBSYSTEM = 0x1100  # "SHOULD be 0x40 or higher" for non-transitional devices

ISR_QUEUE = 0x1
ISR_CONFIG = 0x2


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

    def __init__(self, machine: DeviceHost, backend: VirtioBackend) -> None:
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
        backend.needs_reset = self._needs_reset
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
        except BaseException:
            self._stack.close()
            raise
        self._stack.callback(backend.close)
        self._ioeventfds: dict[int, int] = {}  # queue -> registered doorbell address
        self.common = CommonConfig(
            self.name,
            self.queues,
            backend.features,
            self.msix.vectors,
            reset=self._reset,
            enable_queue=self._enable_queue,
            driver_ok=self._start,
        )
        self.isr = 0
        for cap in virtio_capabilities(self, len(backend.config()), nqueues):
            self.add_capability(cap)
        self.add_capability(self.msix.capability)
        self._queue_of = {eventfd.fd: index for index, eventfd in enumerate(self._notify)}
        self._worker = QueueWorker(
            self.name,
            list(self._queue_of),
            watch=self._watch,
            serve=self._serve,
            failed=self._fail_all,
        )

    def chosen_options(self) -> dict[str, Any]:
        return self.backend.chosen_options()

    # BAR 0

    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index != BAR_INDEX:
            return (1 << (8 * size)) - 1
        if offset + size <= COMMON_SIZE:
            with self._lock:
                return self.common.read(offset, size)
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
                self.common.write(offset, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_MAX:
            with self._lock:
                self.backend.config_write(offset - DEVICE_OFFSET, size, value)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * len(self.queues):
            # Only reached when KVM's ioeventfd did not take the write.
            self._notify[(offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER].signal()
        elif MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
            self.msix.table_write(offset - MSIX_TABLE_OFFSET, size, value)

    # what the common configuration sets off (called with _lock held)

    def _enable_queue(self, index: int) -> None:
        queue = self.queues[index]
        try:
            queue.activate()
        except VirtqueueError as err:
            self._fail(index, err)
            return
        self._sync_ioeventfds()
        self._notify[index].signal()  # buffers may already be waiting

    def _start(self) -> None:
        """DRIVER_OK: the backend starts on the queues, which are served from now on."""
        self.backend.activate(self.common.driver_features, self.queues)
        self._kick_all()

    def _reset(self) -> None:
        """The driver reset the device: the common configuration resets its registers
        itself, after this."""
        for queue in self.queues:
            queue.reset()
        self._sync_ioeventfds()
        for eventfd in self._notify:
            eventfd.read()
        self.backend.reset()
        self.isr = 0

    def _fail(self, index: int, err: Exception) -> None:
        """A queue is unusable: stop using it and tell the driver to reset the device."""
        self.queues[index].broken = True
        self._needs_reset(f"queue {index}: {err}")

    def _needs_reset(self, why: str) -> None:
        """Tell the driver to reset the device (DEVICE_NEEDS_RESET and a configuration
        interrupt; virtio 1.2 §2.1.2), once until it does."""
        log.warning("%s: %s; the device needs a reset", self.name, why)
        common = self.common
        if not common.status & STATUS_DEVICE_NEEDS_RESET:
            common.status |= STATUS_DEVICE_NEEDS_RESET
            self.isr |= ISR_CONFIG
            if common.config_msix_vector != NO_VECTOR:
                self.msix.signal(common.config_msix_vector)

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

    # what the worker thread does

    def _running(self) -> bool:
        return bool(self.common.status & STATUS_DRIVER_OK and self.command & PCI_COMMAND_MASTER)

    def _watch(self) -> dict[int, int]:
        """The backend's input fds (fd -> the queue it feeds), while the device runs."""
        with self._lock:
            return self.backend.input_fds() if self._running() else {}

    def _serve(self, ready: list[int], inputs: dict[int, int]) -> None:
        with self._lock:
            for fd in ready:
                index = self._queue_of.get(fd)
                if index is not None:
                    self._notify[index].read()
                    self._guarded(index, self.backend.process, index)
                elif fd in inputs:
                    self._guarded(inputs[fd], self.backend.input_ready, fd)
            self._raise_used_interrupts()

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

    def _fail_all(self, err: Exception) -> None:
        with self._lock:
            for index in range(len(self.queues)):
                self._fail(index, err)

    # pause (the component protocol)

    def pause(self) -> None:
        """Return once the worker is parked with no request half done (or a resume() came
        first)."""
        self._worker.pause()
        self.backend.pause()

    def resume(self) -> None:
        self.backend.resume()
        self._worker.resume()

    # state

    def save(self) -> VirtioPciState:
        with self._lock:
            common = self.common
            return VirtioPciState(
                function=super().save(),
                status=common.status,
                device_feature_select=common.device_feature_select,
                driver_feature_select=common.driver_feature_select,
                driver_features=common.driver_features,
                config_msix_vector=common.config_msix_vector,
                queue_select=common.queue_select,
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
            for name in CommonConfig.REGISTERS:
                setattr(self.common, name, getattr(state, name))
            self.isr = state.isr
            for queue, queue_state in zip(self.queues, state.queues, strict=True):
                queue.restore(queue_state)
        self.msix.restore(state.msix)
        with self._lock:
            self._sync_ioeventfds()
            if self.common.status & STATUS_DRIVER_OK:
                self._start()

    # teardown

    def close(self) -> None:
        """Stop the worker, remove the doorbells and irqfds, unmap the BAR, release the
        backend."""
        self._worker.close()
        with self._lock:
            for queue in self.queues:
                queue.ready = False
            self._sync_ioeventfds()
        super().close()
        self._stack.close()
