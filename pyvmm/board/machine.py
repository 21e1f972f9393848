"""The Machine: the Python API users script against.

A Machine is a KVM VM with RAM, the standard devices, the optional devices its configuration
names and one thread per vCPU. It boots an image, runs until the guest ends it (debug exit,
reset, power-off, triple fault), the host stops it (`stop()`, Ctrl-C, a timeout) or an error
occurs, can be paused and resumed in between, and tears everything down in reverse order.

    with Machine(mem_size=64 * MiB) as machine:
        machine.load_elf("guests/build/hello.elf")
        result = machine.run()
    print(result.exit_code)

This module only puts the pieces together; each job has a module of its own:

    address_space.py  memory.py   guest-physical map, KVM slots, RAM and device memory
    dirty.py          dma.py      dirty log (KVM's + pyvmm's writes); devices' view of memory
    devices.py        boot.py     device wiring by kind; loading ELF guests and Linux
    vcpus.py          exits.py    vCPU threads, run states, the exit loop; exit statistics
    component.py      state.py    pause/save/restore protocol; state as plain data
    vcpu_state.py     vm_state.py the KVM state of a vCPU; of the VM (irqchip, PIT, clock)
    config.py                     the machine's configuration as data
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pyvmm.board.devices import create_device, wire_platform
from pyvmm.devices.pci.device import PciFunction
from pyvmm.errors import ConfigError
from pyvmm.kvm.irq import GsiRouting
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.kvm.system import System
from pyvmm.kvm.vcpu import Vcpu, install_kick_handler
from pyvmm.machine import boot, cpu, layout, vcpu_report
from pyvmm.machine.address_space import AddressSpace
from pyvmm.machine.bus import Bus
from pyvmm.machine.component import Components, SavedState
from pyvmm.machine.config import DeviceConfig, MachineConfig
from pyvmm.machine.console import CaptureConsole, Console, ConsoleInput, ConsoleTail
from pyvmm.machine.dirty import DirtyLog
from pyvmm.machine.dma import IdentityDma
from pyvmm.machine.exits import ExitStats
from pyvmm.machine.memory import MemoryRegion, RamRegion, RegionKind
from pyvmm.machine.state import StateError
from pyvmm.machine.vcpu_state import VcpuComponent
from pyvmm.machine.vcpus import MachineExit, RunState, StopReason, VcpuThreads
from pyvmm.machine.vm_state import ClockComponent, IrqchipComponent, PitComponent
from pyvmm.uapi import kvm as uapi
from pyvmm.uapi.ioctl import IoctlError

if TYPE_CHECKING:
    from pyvmm.board.guest_iommu import GuestIommu
    from pyvmm.machine.bzimage import LinuxBoot
    from pyvmm.machine.pvh import PvhBoot
    from pyvmm.vfio.context import VfioContext

log = logging.getLogger(__name__)

MIN_MEM = 2 * layout.MiB
WAIT_SLICE = 0.25  # seconds; see wait()
MAX_MEM = 1 << 40
MAX_VCPUS = 64
DEFAULT_MEMORY_SLOTS = 32  # KVM's minimum; KVM_CAP_NR_MEMSLOTS says how many there are

__all__ = ["Machine", "MachineExit", "RunState", "SavedMachine", "StopReason"]

#: Makes the RAM region at (gpa, size, name): by default a new memfd (RamRegion); a restore
#: gives one that maps a snapshot's memory file.
RamSource = Callable[[int, int, str], RamRegion]


@dataclass(frozen=True)
class SavedMachine:
    """A paused machine's configuration and the state of each of its components."""

    config: MachineConfig
    components: list[SavedState]


class Machine:
    """A VM with RAM, the standard devices (COM1, RTC, debug-exit, i8042, ACPI sleep registers,
    PCI host bridge on bus 0) and vCPU threads. Add devices with `add_device(kind, ...)` (or PCI
    functions with `machine.pci.plug(function)`) before the machine starts."""

    def __init__(
        self,
        mem_size: int = 64 * layout.MiB,
        vcpus: int = 1,
        console: Console | None = None,
        *,
        trace_exits: bool = False,
        ram: RamSource = RamRegion,
    ) -> None:
        if mem_size > MAX_MEM:
            raise ConfigError(f"memory size {mem_size} bytes: pyvmm gives a guest at most 1T")
        if mem_size < MIN_MEM or mem_size % PAGE_SIZE:
            raise ConfigError(
                f"memory size {mem_size} bytes: give at least 2M, a multiple of 4 KiB (e.g. -m 64M)"
            )
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ConfigError(f"{vcpus} vCPUs: pyvmm supports 1 to {MAX_VCPUS}")
        self.mem_size = mem_size
        self.console = console or CaptureConsole()
        self.console_tail = ConsoleTail(self.console)  # what the serial port writes to
        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.components = Components()
        self.vcpus: list[Vcpu] = []
        self._devices: list[DeviceConfig] = []
        self._vfio: VfioContext | None = None
        self._guest_iommu: GuestIommu | None = None
        self._input: ConsoleInput | None = None
        self._components_paused = False
        self._unrunnable = ""  # why the machine must not start (a failed restore), if it must not
        self._control = threading.RLock()  # one pause, resume, save or restore at a time
        self._stack = ExitStack()
        try:
            self._build(vcpus, trace_exits, ram)
        except BaseException:
            self._stack.close()
            raise

    @classmethod
    def from_config(
        cls,
        config: MachineConfig,
        console: Console | None = None,
        *,
        trace_exits: bool = False,
        ram: RamSource = RamRegion,
    ) -> Machine:
        """A machine built as `config` says (another's `config`, say): same RAM, vCPUs and
        devices in the same slots."""
        machine = cls(config.mem_size, config.vcpus, console, trace_exits=trace_exits, ram=ram)
        try:
            for device in config.devices:
                machine.add_device(device.kind, slot=device.slot, **device.options)
        except BaseException:
            machine.close()
            raise
        return machine

    # construction

    def _build(self, vcpu_count: int, trace_exits: bool, ram_source: RamSource) -> None:
        self._stack.callback(self.console.close)  # first: a failed build closes it too
        self.system = System()
        self._stack.callback(self.system.close)
        self.system.check_required()
        install_kick_handler()  # now, while on the main thread most likely (vcpus.py says why)
        self.vm = self.system.create_vm()
        self._stack.callback(self.vm.close)
        supported = self.system.supported_cpuid()
        slots = self.vm.check_extension(uapi.KvmCap.NR_MEMSLOTS) or DEFAULT_MEMORY_SLOTS
        self.address_space = AddressSpace(self.vm, slots, phys_bits=cpu.phys_bits(supported))
        self.memory = self.address_space.memory
        self._stack.callback(self.memory.close)
        for number, ram in enumerate(layout.ram_ranges(self.mem_size)):
            region = ram_source(ram.gpa, ram.size, f"ram{number}")
            try:
                self.address_space.add(region)
            except BaseException:
                region.close()
                raise
        for gpa, size, name in layout.RESERVED_RANGES:
            self.address_space.add(MemoryRegion(RegionKind.RESERVED, gpa, size, name=name))
        self.dma = IdentityDma(self.memory)
        self.dirty = DirtyLog(self.address_space)
        self._can_pre_fault = bool(self.vm.check_extension(uapi.KvmCap.PRE_FAULT_MEMORY))
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP)
        self.vm.set_tss_addr(layout.KVM_TSS)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.components.add("irqchip", IrqchipComponent(self.vm))
        self.components.add("pit", PitComponent(self.vm))
        self.components.add("clock", ClockComponent(self.vm))
        self.gsi = GsiRouting(self.vm, self.system.check_extension(uapi.KvmCap.IRQ_ROUTING))
        self.gsi.commit()
        for vcpu_id in range(vcpu_count):
            vcpu = self.vm.create_vcpu(vcpu_id)
            self._stack.callback(vcpu.close)
            vcpu.set_cpuid2(cpu.guest_cpuid(supported, vcpu_id, vcpu_count))
            cpu.check_tsc_counts(vcpu)
            self.vcpus.append(vcpu)
            self.components.add(f"vcpu{vcpu_id}", VcpuComponent(vcpu))
        self.exits = ExitStats(vcpu_count, self.pio, self.mmio, trace=trace_exits)
        self._run_control = VcpuThreads(self.vcpus, self.pio, self.mmio, self.exits)
        # Closed after the PCI functions (an assigned device's BAR slots go before its fd)
        # and before RAM (DMA unmapped before the memory goes).
        self._stack.callback(self._close_vfio)
        platform = wire_platform(self)
        self.serial, self.rtc, self.pci = platform.serial, platform.rtc, platform.pci
        self._stack.callback(self.pci.close)  # device workers and BAR slots, before RAM goes

    @property
    def config(self) -> MachineConfig:
        return MachineConfig(self.mem_size, len(self.vcpus), tuple(self._devices))

    # devices

    def add_device(self, kind: str, *, slot: int | None = None, **options: Any) -> PciFunction:
        """Add an optional device (a kind in pyvmm.board.devices.DEVICE_KINDS: virtio-blk,
        virtio-net, virtio-rng, vfio-pci, pci-testdev) with its options, at `slot` or the first
        free one; recorded in `config`."""
        if self._run_control.started:
            raise ConfigError(f"{kind}: devices are added before the machine starts")
        function = create_device(self, kind, options)
        try:
            slot = self.pci.plug(function, slot)
        except ValueError as err:
            function.close()
            raise ConfigError(f"{kind}: {err}") from None
        except BaseException:
            function.close()
            raise
        self._devices.append(DeviceConfig(kind, {**options, **function.chosen_options()}, slot))
        return function

    def irq_line(self, gsi: int) -> Callable[[int], None]:
        """A callable setting the level of an in-kernel irqchip input (ISA-style devices)."""

        def set_level(level: int) -> None:
            self.vm.irq_line(gsi, level)

        return set_level

    def vfio(self, backend: str | None = None) -> VfioContext:
        """The machine's one IOMMU context, made on first use: every assigned device shares
        it (`backend` "iommufd" or "container"; by default what the host supports)."""
        from pyvmm.vfio.backends import open_context

        if self._vfio is None:
            self._vfio = open_context(backend, self.vm, self.address_space)
            # Its migrating devices stop when the machine pauses, in P2P order, and their DMA
            # writes are in the machine's dirty log (pyvmm.vfio.migration.group).
            self.components.add("vfio-migration", self._vfio.migrations)
            self.dirty.add_source(self._vfio.migrations)
        elif backend is not None and backend != self._vfio.backend:
            raise ConfigError(
                f"this machine's assigned devices use the {self._vfio.backend} backend; all of "
                f"them share one IOMMU context, so {backend} cannot be added"
            )
        return self._vfio

    @property
    def vfio_backend(self) -> str | None:
        """The backend of the machine's IOMMU context, once it has one."""
        return self._vfio.backend if self._vfio is not None else None

    def guest_iommu(self) -> GuestIommu:
        """The machine's virtio-iommu (`--viommu virtio`), made on first use."""
        from pyvmm.board.guest_iommu import GuestIommu

        if self._guest_iommu is None:
            self._guest_iommu = GuestIommu(self)
        return self._guest_iommu

    @property
    def viommu_domains(self) -> dict[str, object] | None:
        """The virtio-iommu's domains as GuestDomains.describe() gives them; None without one."""
        return self._guest_iommu.domains.describe() if self._guest_iommu is not None else None

    def _close_vfio(self) -> None:
        for part in (self._guest_iommu, self._vfio):  # the guest's domains before the context
            if part is not None:
                part.close()
        self._guest_iommu = self._vfio = None

    # boot

    def load_linux(
        self, kernel: str, initrd: str | None = None, cmdline: str = ""
    ) -> LinuxBoot | PvhBoot:
        """Boot Linux: a bzImage, or a vmlinux with a PVH entry note (see pyvmm.machine.boot)."""
        extra = (self._guest_iommu.viot(),) if self._guest_iommu is not None else ()
        return boot.boot_linux(
            self.memory,
            self.vcpus,
            kernel,
            initrd,
            cmdline,
            pci_memory=self.pci.memory_windows,
            acpi_tables=extra,
        )

    def load_elf(self, path: str) -> None:
        """Load an ELF64 test guest and point the boot vCPU at its entry in long mode."""
        boot.boot_elf(self.memory, self.vcpus, path)

    def pre_fault(self, gpa: int, size: int) -> bool:
        """Map the guest RAM at [gpa, gpa + size) into KVM's page tables now
        (KVM_PRE_FAULT_MEMORY), so that the guest's first touch of each page takes no fault:
        an incoming migration's pages, before the guest resumes on them (nested under TCG a
        fault costs most of a millisecond, and a Linux guest touches a thousand pages in its
        first second). Only while no vCPU is in the guest. False, having done nothing, where
        KVM cannot (no KVM_CAP_PRE_FAULT_MEMORY, or the vCPU is on shadow paging): the pages
        then fault in as the guest touches them, as they would have anyway."""
        if self.state is RunState.RUNNING:
            raise StateError("guest memory is pre-faulted with the vCPUs out of the guest: pause")
        if not self._can_pre_fault:
            return False
        try:
            self.vcpus[0].pre_fault_memory(gpa, size)
        except IoctlError as err:
            self._can_pre_fault = False
            if err.errno != errno.EOPNOTSUPP:
                log.warning("not pre-faulting guest memory (the guest faults it in): %s", err)
            return False
        return True

    @property
    def can_pre_fault(self) -> bool:
        """Whether `pre_fault` maps pages (as far as pyvmm knows: KVM may still refuse)."""
        return self._can_pre_fault

    # running

    @property
    def state(self) -> RunState:
        return self._run_control.state

    def start(self) -> None:
        """Start the vCPU threads (and console input) and return; see `wait()`."""
        if self._unrunnable:
            raise StateError(f"this machine cannot run: {self._unrunnable}")
        fd = self.console.input_fd()
        if fd is not None:
            self._input = ConsoleInput(fd, self.serial.receive)
            if self._components_paused:
                self._input.pause()
            self.components.add("console-input", self._input)
        self._run_control.start()

    def wait(self, timeout: float | None = None) -> MachineExit:
        """Wait until the machine stops; returns how it ended. With `timeout` (seconds) it is
        stopped when that expires; Ctrl-C stops it too."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stopped_here = False  # by the timeout or Ctrl-C: then say where each vCPU was
        try:
            # In slices, not one wait: Python runs a signal's handler (Ctrl-C) only when the
            # main thread runs bytecode, and a wait the signal did not interrupt (it went to
            # another thread) would otherwise never return to let it.
            while True:
                left = WAIT_SLICE if deadline is None else deadline - time.monotonic()
                if self._run_control.done.wait(max(0.0, min(WAIT_SLICE, left))):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    self.stop(StopReason.STOPPED, 124, f"timed out after {timeout} s")
                    stopped_here = True
                    break
        except KeyboardInterrupt:
            self.stop(StopReason.STOPPED, 130, "interrupted")
            stopped_here = True
        finally:
            self._run_control.join()
            self._stop_input()
        result = self._run_control.result
        assert result is not None
        if stopped_here and result.reason is StopReason.STOPPED:
            result = replace(result, vcpus=self._where_vcpus_are())
        elif result.crashed_vcpu is not None:
            result = replace(result, vcpus=self._where_vcpus_are(but=result.crashed_vcpu))
        return result

    def _where_vcpus_are(self, but: int | None = None) -> tuple[str, ...]:
        """A line for each vCPU (they are out of KVM_RUN) but `but`: where a guest that hung
        (or was interrupted) was, or what the others were doing when one crashed."""
        lines = []
        for vcpu in self.vcpus:
            if vcpu.id == but:
                continue
            try:
                lines.append(vcpu_report.describe(vcpu))
            except (OSError, ValueError) as err:
                lines.append(f"vcpu{vcpu.id}: its state cannot be read ({err})")
        return tuple(lines)

    def run(self, timeout: float | None = None) -> MachineExit:
        """Run the vCPUs until the machine stops; returns how it ended (`start` + `wait`)."""
        self.start()
        return self.wait(timeout)

    def pause(self) -> bool:
        """From any thread but a vCPU's: return once no vCPU is in the guest and every device
        has stopped touching it; the machine's state can then be read and written. False if
        the machine stopped instead."""
        with self._control:
            if not self._run_control.pause():
                return False
            if not self._components_paused:
                try:
                    self.components.pause_all()
                except BaseException:
                    self._run_control.resume()  # (a part that would not stop: run on)
                    raise
                self._components_paused = True
            return True

    def resume(self) -> None:
        """Carry on after `pause()` (StateError if a failed restore left it unrunnable)."""
        with self._control:
            if self._unrunnable:
                raise StateError(f"this machine cannot run: {self._unrunnable}")
            if self._components_paused:
                self.components.resume_all()
                self._components_paused = False
            self._run_control.resume()

    def throttle(self, fraction: float) -> None:
        """Keep the vCPUs out of the guest for `fraction` (0 to 0.99) of the time, from any
        thread; 0 ends it. A migration slows a guest down this way (auto-converge)."""
        self._run_control.throttle(fraction)

    @property
    def throttle_fraction(self) -> float:
        return self._run_control.throttle_fraction

    @property
    def throttled_seconds(self) -> float:
        """How long the vCPUs have slept in throttle, summed over them."""
        return self._run_control.throttled_seconds

    def stop(
        self, reason: StopReason = StopReason.STOPPED, code: int = 0, detail: str = ""
    ) -> None:
        """End the run (from any thread). The first reason given wins."""
        self._run_control.stop(reason, code, detail)

    def _stop_input(self) -> None:
        if self._input is not None:
            self.components.remove("console-input")
            self._input.close()
            self._input = None

    # state

    def save(self) -> SavedMachine:
        """The configuration and every component's state. The machine must not be running;
        device workers of a machine not paused (not started, or stopped) are paused meanwhile."""
        with self._control, self._quiet_components("saving"):
            return SavedMachine(self.config, self.components.save_all())

    def restore(self, saved: SavedMachine) -> None:
        """Take a saved machine's state. Everything pyvmm can check is checked before anything
        changes; should the kernel still refuse a part's state, the machine keeps a mix of
        states and refuses to start."""
        with self._control, self._quiet_components("restoring a state into it"):
            differences = saved.config.differences(self.config)
            if differences:
                raise StateError(
                    f"the saved machine differs from this one: {'; '.join(differences)}"
                )
            decoded = self.components.decode(saved.components)
            try:
                self.components.apply(decoded)
            except BaseException as err:
                self._unrunnable = f"restoring a state into it failed ({err})"
                raise

    @contextmanager
    def _quiet_components(self, doing: str) -> Iterator[None]:
        if self.state is RunState.RUNNING:
            raise RuntimeError(f"pause the machine before {doing}")
        if self._components_paused:
            yield
            return
        self.components.pause_all()
        try:
            yield
        finally:
            self.components.resume_all()

    # teardown

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the machine closes, after its vCPUs have ended and before its
        devices and RAM go (what uses them, such as a post-copy still bringing RAM in)."""
        self._stack.callback(callback)

    def close(self) -> None:
        if self.state in (RunState.RUNNING, RunState.PAUSED):
            self.stop()
        self._run_control.join()
        self._stop_input()
        self._stack.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
