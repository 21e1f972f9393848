"""The Machine: the Python API users script against.

A Machine owns a KVM VM, its RAM, its devices and one thread per vCPU. It boots an image, runs
until the guest ends it (debug exit, reset, triple fault), the host stops it (`stop()`, Ctrl-C) or
an error occurs, and then tears everything down in reverse order.

    with Machine(mem_size=64 * MiB) as vm:
        vm.load_elf("guests/build/hello.elf")
        result = vm.run()
    print(result.exit_code)
"""

from __future__ import annotations

import enum
import logging
import os
import select
import threading
from collections import Counter, deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from pyvmm.devices.acpi_pm import AcpiSleepRegisters
from pyvmm.devices.debug_exit import DebugExit
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.pci.bus import PciBus
from pyvmm.devices.pci.host import ConfigPorts, Ecam, HostBridge
from pyvmm.devices.rtc import CmosRtc
from pyvmm.devices.serial import Serial8250
from pyvmm.errors import BootError, ConfigError
from pyvmm.kvm.errors import KvmError
from pyvmm.kvm.irq import GsiRouting
from pyvmm.kvm.system import System
from pyvmm.kvm.vcpu import Vcpu, install_kick_handler
from pyvmm.machine import acpi, cpu, layout
from pyvmm.machine.bus import Bus, BusDevice, Range
from pyvmm.machine.bzimage import LinuxBoot, load_linux, parse_bzimage
from pyvmm.machine.console import CaptureConsole, Console
from pyvmm.machine.elf import is_elf, load_elf, parse_elf
from pyvmm.machine.memory import PAGE_SIZE, GuestMemory, RamRegion
from pyvmm.machine.pvh import PvhBoot, enter_protected_mode, load_pvh, pvh_entry
from pyvmm.uapi import kvm as uapi

log = logging.getLogger(__name__)

KvmExit = uapi.KvmExit
MIN_MEM = 2 * layout.MiB
MAX_VCPUS = 64
# exit_summary() names at most this many places per vCPU; a guest probing more addresses
# (unclaimed MMIO, say) has the rest counted together, so tracing memory stays bounded.
MAX_COUNTED_PLACES = 4096
OTHER_PLACES = -1


def _exit_name(reason: int) -> str:
    """KVM_EXIT_<name> for a known exit reason, else the number."""
    return KvmExit(reason).name if reason in KvmExit._value2member_map_ else str(reason)


def _exit_kind(reason: int) -> str:
    return "pio" if reason == KvmExit.IO else _exit_name(reason).lower()


def _count(counts: Counter[tuple[int, int]], reason: int, where: int) -> None:
    key = (reason, where)
    if key not in counts and len(counts) >= MAX_COUNTED_PLACES:
        key = (reason, OTHER_PLACES)
    counts[key] += 1


class StopReason(enum.Enum):
    DEBUG_EXIT = "debug-exit"
    RESET = "reset"
    POWEROFF = "poweroff"
    TRIPLE_FAULT = "triple-fault"
    STOPPED = "stopped"  # the host asked (stop(), Ctrl-C)
    ERROR = "error"


@dataclass(frozen=True)
class MachineExit:
    """How a run ended. `exit_code` is what `pyvmm run` exits with."""

    reason: StopReason
    exit_code: int
    detail: str = ""


class Machine:
    """A VM with RAM, the standard devices (COM1, debug-exit, i8042, PCI host bridge on bus 0)
    and vCPU threads. Add PCI functions with `machine.pci.plug(function)` before `run()`."""

    def __init__(
        self,
        mem_size: int = 64 * layout.MiB,
        vcpus: int = 1,
        console: Console | None = None,
        *,
        trace_exits: bool = False,
    ) -> None:
        if mem_size < MIN_MEM or mem_size % PAGE_SIZE:
            raise ConfigError(
                f"memory size {mem_size} bytes: give at least 2M, a multiple of 4 KiB (e.g. -m 64M)"
            )
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ConfigError(f"{vcpus} vCPUs: pyvmm supports 1 to {MAX_VCPUS}")
        self.mem_size = mem_size
        self.vcpu_count = vcpus
        self.console = console or CaptureConsole()
        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.memory = GuestMemory()
        self.vcpus: list[Vcpu] = []
        self.exit_count = 0
        # With trace_exits: the last 100k exits in order, and per vCPU (so no thread loses a
        # count) a count of every exit by (reason, port or address), for exit_summary().
        self.exit_trace: deque[tuple[int, int]] | None = (
            deque(maxlen=100_000) if trace_exits else None
        )
        self._exit_counts: list[Counter[tuple[int, int]]] = [Counter() for _ in range(vcpus)]
        self._result: MachineExit | None = None
        self._done = threading.Event()
        self._stop_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._dirty_logging = False
        self._stack = ExitStack()
        try:
            self._build()
        except BaseException:
            self._stack.close()
            raise

    # construction

    def _build(self) -> None:
        self.system = System()
        self._stack.callback(self.system.close)
        self.vm = self.system.create_vm()
        self._stack.callback(self.vm.close)
        self._stack.callback(self.memory.close)
        for slot, ram in enumerate(layout.ram_ranges(self.mem_size)):
            region = RamRegion(ram.gpa, ram.size)
            region.slot = slot
            self.memory.add(region)
            self._register_slot(region)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP)
        self.vm.set_tss_addr(layout.KVM_TSS)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.gsi = GsiRouting(self.vm, self.system.check_extension(uapi.KvmCap.IRQ_ROUTING))
        self.gsi.commit()
        supported = self.system.supported_cpuid()
        for vcpu_id in range(self.vcpu_count):
            vcpu = self.vm.create_vcpu(vcpu_id)
            self._stack.callback(vcpu.close)
            vcpu.set_cpuid2(cpu.guest_cpuid(supported, vcpu_id, self.vcpu_count))
            self.vcpus.append(vcpu)
        self._stack.callback(self.console.close)
        self.serial = Serial8250(self.console.write, self.irq_line(layout.COM1_IRQ))
        self.add_pio_device(layout.COM1_PORT, 8, self.serial, "COM1")
        self.add_pio_device(layout.DEBUG_EXIT_PORT, 1, DebugExit(self._debug_exit), "debug-exit")
        self.add_pio_device(layout.I8042_DATA_PORT, 5, I8042(self._reset), "i8042")
        self.rtc = CmosRtc()
        self.add_pio_device(layout.RTC_PORT, 2, self.rtc, "rtc")
        self.pci = PciBus(
            self.pio,
            self.mmio,
            (layout.PCI_MMIO_BASE, layout.PCI_MMIO_BASE + layout.PCI_MMIO_SIZE),
            (layout.PCI_IO_BASE, layout.PCI_IO_BASE + layout.PCI_IO_SIZE),
        )
        self.pci.plug(HostBridge(), slot=0)
        sleep = AcpiSleepRegisters(self._poweroff, acpi.S5_SLEEP_TYPE)
        self.add_pio_device(acpi.SLEEP_CONTROL_PORT, 2, sleep, "acpi-sleep")
        config_ports = ConfigPorts(self.pci, self._reset)
        self.add_pio_device(layout.PCI_CONFIG_PORT, 8, config_ports, "pci-config")
        self.add_mmio_device(layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE, Ecam(self.pci), "ecam")

    def _register_slot(self, region: RamRegion) -> None:
        flags = uapi.KVM_MEM_LOG_DIRTY_PAGES if self._dirty_logging else 0
        self.vm.set_user_memory_region(
            region.slot, region.gpa, region.size, region.host_addr, flags
        )

    # the device-facing API

    def add_pio_device(self, port: int, length: int, device: BusDevice, name: str = "") -> None:
        self.pio.register(port, length, device, name)

    def add_mmio_device(self, addr: int, length: int, device: BusDevice, name: str = "") -> None:
        self.mmio.register(addr, length, device, name)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the machine is closed (before RAM and the VM go away), in
        reverse order of registration: devices stop their worker threads here."""
        self._stack.callback(callback)

    def irq_line(self, gsi: int) -> Any:
        """A callable setting the level of an in-kernel irqchip input (ISA-style devices)."""

        def set_level(level: int) -> None:
            self.vm.irq_line(gsi, level)

        return set_level

    # boot

    def load_linux(
        self, kernel: str, initrd: str | None = None, cmdline: str = ""
    ) -> LinuxBoot | PvhBoot:
        """Boot Linux: a bzImage by the x86 boot protocol (64-bit entry), or an uncompressed
        vmlinux ELF through its PVH entry note. Either way the guest gets ACPI tables (CPUs, PCI
        root, power-off), the command line and the initrd."""
        tables = acpi.write_tables(self.memory, self.vcpu_count)
        for vcpu in self.vcpus:
            cpu.set_boot_msrs(vcpu)
        if is_elf(kernel):
            entry = pvh_entry(kernel)
            if entry is None:
                raise BootError(
                    f"{kernel}: ELF without a PVH entry note; build Linux with CONFIG_PVH=y, "
                    "or boot its bzImage"
                )
            pvh = load_pvh(
                kernel, entry, self.memory, self.mem_size, cmdline, initrd, tables.rsdp_address
            )
            enter_protected_mode(self.memory, self.vcpus[0], pvh)
            return pvh
        image = parse_bzimage(kernel)
        boot = load_linux(image, self.memory, self.mem_size, cmdline, initrd, tables.rsdp_address)
        cpu.write_boot_tables(self.memory)
        cpu.enter_long_mode(self.vcpus[0], boot.entry, rsi=boot.zero_page)
        return boot

    def load_elf(self, path: str) -> None:
        """Load an ELF64 executable and point the boot vCPU at its entry in long mode."""
        image = parse_elf(path)
        load_elf(image, self.memory)
        cpu.write_boot_tables(self.memory)
        low_ram = min(self.mem_size, layout.LOW_RAM_LIMIT)
        cpu.enter_long_mode(self.vcpus[0], image.entry, rdi=low_ram, rsi=self.vcpu_count)

    # dirty logging

    def set_dirty_logging(self, enabled: bool) -> None:
        """Turn KVM dirty-page logging on or off for all RAM slots."""
        self._dirty_logging = enabled
        for region in self.memory.regions:
            self._register_slot(region)

    def dirty_pages(self) -> list[int]:
        """Guest-physical page addresses written since the last call (or since enabling)."""
        if not self._dirty_logging:
            raise KvmError("dirty logging is off; call set_dirty_logging(True) first")
        pages = []
        for region in self.memory.regions:
            bitmap = self.vm.get_dirty_log(region.slot, region.size)
            for byte_index, byte in enumerate(bitmap):
                if not byte:
                    continue
                for bit in range(8):
                    if byte >> bit & 1:
                        pages.append(region.gpa + (byte_index * 8 + bit) * PAGE_SIZE)
        return pages

    # exit statistics

    def exit_summary(self) -> list[tuple[str, str, int]]:
        """With trace_exits: (kind, where, count) for every kind of exit seen, most frequent
        first. `where` names the device range and the offset in it (`COM1+0x5`), or the bare
        address when no device claims it: the map of what a guest makes pyvmm do in Python."""
        buses = {int(KvmExit.IO): self.pio, int(KvmExit.MMIO): self.mmio}
        totals: Counter[tuple[str, str]] = Counter()
        for (reason, where), count in sum(self._exit_counts, Counter()).items():
            bus = buses.get(reason)
            if where == OTHER_PLACES:
                place = "(other places)"
            elif bus is not None:
                found = bus.find(where)
                place = f"{where:#x}" if found is None else f"{found.name}+{where - found.base:#x}"
            else:
                place = ""
            totals[_exit_kind(reason), place] += count
        return [(kind, where, count) for (kind, where), count in totals.most_common()]

    # running

    def run(self, timeout: float | None = None) -> MachineExit:
        """Run the vCPUs until the machine stops; returns how it ended.

        With `timeout` (seconds) the machine is stopped when it expires. Ctrl-C stops it too.
        """
        install_kick_handler()
        input_stop = self._start_input()
        for vcpu in self.vcpus:
            thread = threading.Thread(
                target=self._vcpu_thread, args=(vcpu,), name=f"vcpu{vcpu.id}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        try:
            if not self._done.wait(timeout):
                self.stop(StopReason.STOPPED, 124, f"timed out after {timeout} s")
        except KeyboardInterrupt:
            self.stop(StopReason.STOPPED, 130, "interrupted")
        finally:
            self._kick_all()
            for thread in self._threads:
                thread.join()
            self._threads.clear()
            if input_stop is not None:
                input_stop()
        assert self._result is not None
        return self._result

    def stop(
        self, reason: StopReason = StopReason.STOPPED, code: int = 0, detail: str = ""
    ) -> None:
        """End the run (from any thread). The first reason given wins."""
        with self._stop_lock:
            if self._result is None:
                self._result = MachineExit(reason, code, detail)
        self._done.set()
        self._kick_all()

    def _kick_all(self) -> None:
        for vcpu in self.vcpus:
            vcpu.kick()

    def _debug_exit(self, code: int) -> None:
        self.stop(StopReason.DEBUG_EXIT, code)

    def _poweroff(self) -> None:
        self.stop(StopReason.POWEROFF, 0, "guest powered off")

    def _reset(self) -> None:
        self.stop(StopReason.RESET, 0, "guest requested a reset")

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        vcpu.thread_id = threading.get_ident()
        try:
            if self._done.is_set():
                return
            self._run_vcpu(vcpu)
        except Exception as err:  # a bug or a kernel error must still stop the machine
            log.exception("vcpu%d failed", vcpu.id)
            self.stop(StopReason.ERROR, 1, f"vcpu{vcpu.id}: {err}")
        finally:
            vcpu.thread_id = None

    def _run_vcpu(self, vcpu: Vcpu) -> None:
        """The exit loop: the hot path of every PIO/MMIO access the kernel does not handle.

        Names are bound to locals and `done` is only checked on KVM_EXIT_INTR (which every
        `stop()` causes through a kick), to keep per-exit Python work minimal.
        """
        run, io_exit, page = vcpu.run, vcpu.io_exit, vcpu.run_page
        find_port, find_mmio = self.pio.find, self.mmio.find
        trace, counts = self.exit_trace, self._exit_counts[vcpu.id]
        exit_io, exit_mmio, exit_intr = int(KvmExit.IO), int(KvmExit.MMIO), int(KvmExit.INTR)
        io_out = uapi.KVM_EXIT_IO_OUT
        while True:
            reason = run()
            self.exit_count += 1
            if reason == exit_io:
                direction, size, port, count, offset = io_exit()
                if trace is not None:
                    trace.append((reason, port))
                    _count(counts, reason, port)
                found = find_port(port)
                if direction == io_out and count == 1 and found is not None:
                    value = int.from_bytes(page[offset : offset + size], "little")
                    self._access(found, port - found.base, size, value)
                else:
                    self._port_io(found, direction, size, port, count, offset, page)
            elif reason == exit_mmio:
                addr, data, length, is_write = vcpu.mmio_exit()
                if trace is not None:
                    trace.append((reason, addr))
                    _count(counts, reason, addr)
                found = find_mmio(addr)
                if length not in (1, 2, 4, 8):
                    continue
                if is_write:
                    if found is not None:
                        value = int.from_bytes(data[:length], "little")
                        self._access(found, addr - found.base, length, value)
                else:
                    value = self._access(found, addr - found.base, length, None) if found else -1
                    vcpu.set_mmio_data(
                        (value & ((1 << (8 * length)) - 1)).to_bytes(length, "little")
                    )
            elif reason == exit_intr:
                if trace is not None:
                    _count(counts, reason, 0)
                if self._done.is_set():
                    return
            else:
                self._exit_other(vcpu, reason)

    def _port_io(
        self,
        found: Range | None,
        direction: int,
        size: int,
        port: int,
        count: int,
        offset: int,
        page: memoryview,
    ) -> None:
        """Port input, and string (rep ins/outs) output: `count` items of `size` bytes."""
        all_ones = (1 << (8 * size)) - 1
        for pos in range(offset, offset + size * count, size):
            if direction == uapi.KVM_EXIT_IO_OUT:
                if found is not None:
                    value = int.from_bytes(page[pos : pos + size], "little")
                    self._access(found, port - found.base, size, value)
            else:
                value = (
                    all_ones
                    if found is None
                    else self._access(found, port - found.base, size, None)
                )
                page[pos : pos + size] = value.to_bytes(size, "little")

    def _access(self, found: Range, offset: int, size: int, value: int | None) -> int:
        """One device access. A device that raises is a pyvmm bug, but the guest drove it
        there: log it, answer all-ones, keep the VM running."""
        mask = (1 << (8 * size)) - 1
        try:
            if value is None:
                return found.device.read(offset, size) & mask
            found.device.write(offset, size, value)
        except Exception:
            log.exception("%s: access at +%#x (size %d) failed", found.name, offset, size)
        return mask

    def _exit_other(self, vcpu: Vcpu, reason: int) -> None:
        if self.exit_trace is not None:
            self.exit_trace.append((reason, 0))
            _count(self._exit_counts[vcpu.id], reason, 0)
        run = vcpu.exit_struct()
        if reason == KvmExit.SHUTDOWN:
            where = cpu.describe_regs(vcpu, after_shutdown=True)
            self.stop(
                StopReason.TRIPLE_FAULT, 1, f"vcpu{vcpu.id}: guest triple-faulted (reset); {where}"
            )
        elif reason == KvmExit.SYSTEM_EVENT:
            kind = run.system_event.type
            if kind == uapi.KvmSystemEvent.RESET:
                self._reset()
            elif kind == uapi.KvmSystemEvent.SHUTDOWN:
                self._poweroff()
            else:
                self.stop(StopReason.ERROR, 1, f"vcpu{vcpu.id}: system event {kind}")
        elif reason == KvmExit.HLT:
            # Only without an in-kernel LAPIC; pyvmm always has one, so treat as poweroff.
            self.stop(StopReason.POWEROFF, 0, "guest halted")
        elif reason == KvmExit.INTERNAL_ERROR:
            self.stop(
                StopReason.ERROR,
                1,
                f"vcpu{vcpu.id}: KVM internal error, suberror {run.internal.suberror}; "
                f"{cpu.describe_regs(vcpu)}",
            )
        elif reason == KvmExit.FAIL_ENTRY:
            self.stop(
                StopReason.ERROR,
                1,
                f"vcpu{vcpu.id}: VM entry failed, hardware reason "
                f"{run.fail_entry.hardware_entry_failure_reason:#x}",
            )
        else:
            self.stop(
                StopReason.ERROR, 1, f"vcpu{vcpu.id}: unhandled KVM exit {_exit_name(reason)}"
            )

    def _start_input(self) -> Any:
        """Forward console input to COM1 from a thread; returns a function that stops it."""
        fd = self.console.input_fd()
        if fd is None:
            return None
        wake_r, wake_w = os.pipe()

        def pump() -> None:
            pending = b""
            while True:
                ready, _, _ = select.select([fd, wake_r], [], [], 0.05 if pending else None)
                if wake_r in ready:
                    return
                if not pending and fd in ready:
                    pending = os.read(fd, 64)
                    if not pending:
                        return
                if pending:
                    taken = self.serial.receive(pending)
                    pending = pending[taken:]

        thread = threading.Thread(target=pump, name="console-input", daemon=True)
        thread.start()

        def stop_input() -> None:
            os.write(wake_w, b"x")
            thread.join()
            os.close(wake_r)
            os.close(wake_w)

        return stop_input

    # teardown

    def close(self) -> None:
        if self._threads:
            self.stop()
            for thread in self._threads:
                thread.join()
        self._stack.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
