"""vCPU threads, their run states, and the exit loop.

One thread per vCPU runs KVM_RUN and handles the exits the kernel hands to userspace: port and
MMIO accesses go to the device registered for the address; everything else ends the run with a
reason. The machine is in one of four run states (Firecracker's VcpuRunState, machine-wide):

    CREATED --start()--> RUNNING --pause()--> PAUSED --resume()--> RUNNING
                            \\-----------stop() (any state)-----------> STOPPED

`stop()` works from any thread, `pause()` from any thread but a vCPU's own: they set a flag and
kick every vCPU out of KVM_RUN (immediate_exit plus a signal, so a halted vCPU or one waiting for
its SIPI leaves too); the exit loop looks at the flag only on KVM_EXIT_INTR, which every kick
causes, so the hot path pays nothing for it. A vCPU pauses only there: KVM has then completed
the I/O of the previous exit (KVM_RUN finishes pending MMIO/PIO before it honours
immediate_exit), so a paused vCPU's registers are consistent and can be read and written.
`pause()` returns once every vCPU thread is parked (or gone); `resume()` lets them re-enter the
guest. A resume that overtakes a pause still waiting cancels it (pause() then returns False):
each resume starts a new generation.

`throttle(fraction)` slows the guest down without pausing it, for a migration whose guest dirties
memory faster than it can be sent (QEMU's auto-converge): a throttle thread kicks every vCPU once
per period, and each vCPU sleeps for `fraction` of that period before it re-enters the guest.

The kick is a signal with a no-op handler, which Python installs only from the main thread:
the first machine of a process is built there (or start() says so).

An exit pyvmm handles needs the GIL, and while another thread runs Python (a migration's rounds,
post-copy's pages coming in, a device worker, the control socket) a vCPU waiting for the GIL gets
it only when that thread is made to let go: a switch interval later, 5 ms by Python's default,
which a guest printing a line (an exit a character) feels. So `start()` shortens the process's
switch interval to VCPU_SWITCH_INTERVAL (if it is longer), until the last machine running stops
(then it is put back as it was): on this host, with one thread spinning
in Python beside it, a port-write exit took 2.8 ms at the default and 0.2 ms at 0.2 ms
(scripts/bench-exits); with no other thread running Python, the interval makes no difference.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import time
from dataclasses import dataclass

from pyvmm.kvm import exitloop
from pyvmm.kvm.errors import KvmError
from pyvmm.kvm.vcpu import Vcpu, install_kick_handler
from pyvmm.machine import vcpu_report
from pyvmm.machine.bus import Bus, Range
from pyvmm.machine.exits import ExitStats, exit_name
from pyvmm.machine.threads import start_thread
from pyvmm.uapi import kvm as uapi
from pyvmm.uapi.ioctl import IoctlError

log = logging.getLogger(__name__)

KvmExit = uapi.KvmExit

# How long the guest runs between two throttle sleeps (QEMU's CPU_THROTTLE_TIMESLICE): short
# enough that a throttled guest still answers its timers, long enough to cost little.
THROTTLE_SLICE = 0.01
MAX_THROTTLE = 0.99
VCPU_SWITCH_INTERVAL = 0.0002  # seconds (the module's docstring says why)


class RunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class StopReason(enum.Enum):
    DEBUG_EXIT = "debug-exit"
    RESET = "reset"
    POWEROFF = "poweroff"
    TRIPLE_FAULT = "triple-fault"
    STOPPED = "stopped"  # the host asked (stop(), Ctrl-C, a timeout)
    ERROR = "error"


@dataclass(frozen=True)
class MachineExit:
    """How a run ended. `exit_code` is what `pyvmm run` exits with."""

    reason: StopReason
    exit_code: int
    detail: str = ""
    #: the crashed vCPU's report (vcpu_report.describe_crash), after a triple fault or a KVM
    #: internal error
    crash: tuple[str, ...] = ()
    crashed_vcpu: int | None = None
    #: where each vCPU was when a run that timed out was stopped, or, after a crash, each of
    #: the other vCPUs (vcpu_report.describe)
    vcpus: tuple[str, ...] = ()


class _SwitchInterval:
    """The process's switch interval: at most VCPU_SWITCH_INTERVAL while any machine's vCPUs
    run, and as it was before once the last of them has stopped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._before = 0.0

    def hold(self) -> None:
        with self._lock:
            if not self._holders:
                self._before = sys.getswitchinterval()
                sys.setswitchinterval(min(self._before, VCPU_SWITCH_INTERVAL))
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if not self._holders:
                sys.setswitchinterval(self._before)


_SWITCH_INTERVAL = _SwitchInterval()


class VcpuThreads:
    """The vCPU threads of one machine and the run state they share."""

    def __init__(self, vcpus: list[Vcpu], pio: Bus, mmio: Bus, exits: ExitStats) -> None:
        self.vcpus = vcpus
        self._pio = pio
        self._mmio = mmio
        self.exits = exits
        self.state = RunState.CREATED
        self.result: MachineExit | None = None
        self.done = threading.Event()
        self._cond = threading.Condition()
        self._interrupt = False  # the exit loop's one check: stop or pause asked for
        self._pausing = False
        self._generation = 0  # resume() counts up: a pause older than that was cancelled
        self._parked: set[int] = set()
        self._threads: dict[int, threading.Thread] = {}
        self._throttle = 0.0  # the fraction of time asked for
        self._throttle_sleep = 0.0  # what each kicked vCPU sleeps now (0: no throttle)
        self._throttler: threading.Thread | None = None
        self.throttled_seconds = 0.0  # the vCPUs' sleeps, summed (approximate, unlocked)
        self._holds_switch_interval = False

    # control (any thread but a vCPU's)

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        with self._cond:
            if self._threads or self.state is RunState.STOPPED:
                raise RuntimeError(f"the machine is {self.state.value}; it starts only once")
            if not install_kick_handler():
                raise KvmError(
                    "pyvmm kicks vCPUs with a signal whose handler only the main thread can "
                    "install: build (or start) the first machine from the main thread"
                )
            self.state = RunState.PAUSED if self._pausing else RunState.RUNNING
            _SWITCH_INTERVAL.hold()
            self._holds_switch_interval = True
            for vcpu in self.vcpus:
                self._threads[vcpu.id] = start_thread(self._thread, f"vcpu{vcpu.id}", vcpu)
            self._start_throttler()

    def stop(
        self,
        reason: StopReason,
        code: int = 0,
        detail: str = "",
        *,
        crashed: Vcpu | None = None,
        crash: tuple[str, ...] = (),
    ) -> None:
        """End the run, from any thread (a vCPU's too). The first reason given wins. `crashed`:
        the vCPU whose crash (`crash`: its report) ended the run."""
        with self._cond:
            if self.result is None:
                crashed_id = None if crashed is None else crashed.id
                self.result = MachineExit(reason, code, detail, crash, crashed_id)
            self.state = RunState.STOPPED
            self._interrupt = True
            self._cond.notify_all()
            if self._holds_switch_interval:
                self._holds_switch_interval = False
                _SWITCH_INTERVAL.release()
        self.done.set()
        self._kick_all()

    def pause(self) -> bool:
        """Park every vCPU; True once all are parked, False if the machine stopped instead.
        Pausing a machine that has not started makes it start paused."""
        if threading.current_thread() in self._threads.values():
            raise RuntimeError("pause() on a vCPU thread would wait for itself")
        with self._cond:
            if self.state in (RunState.PAUSED, RunState.STOPPED):
                return self.state is RunState.PAUSED
            self._pausing = True
            if self.state is RunState.CREATED:
                self.state = RunState.PAUSED  # its threads will park as they start
                return True
            self._interrupt = True
            self._cond.notify_all()  # a vCPU in a throttle sleep parks at once
            generation = self._generation
        self._kick_all()
        with self._cond:
            while (
                self.state is RunState.RUNNING
                and generation == self._generation
                and self._parked != self._live()
            ):
                self._cond.wait()
            if generation != self._generation:
                return False  # a resume() came first
            if self.state is RunState.RUNNING:
                self.state = RunState.PAUSED
            return self.state is RunState.PAUSED

    def resume(self) -> None:
        with self._cond:
            if self.state is RunState.STOPPED:
                return
            self._generation += 1
            self._pausing = False
            self._interrupt = False
            if self.state is RunState.PAUSED and self._threads:
                self.state = RunState.RUNNING
            elif self.state is RunState.PAUSED:
                self.state = RunState.CREATED  # paused before it ever started
            self._cond.notify_all()

    def throttle(self, fraction: float) -> None:
        """Keep every vCPU out of the guest for `fraction` (0 to 0.99) of the time; 0 ends
        the throttle. From any thread; the throttle also ends when the machine stops."""
        if not 0 <= fraction <= MAX_THROTTLE:
            raise ValueError(f"a throttle is 0 to {MAX_THROTTLE}, not {fraction}")
        with self._cond:
            self._throttle = fraction
            if self._threads:  # (else start() starts it: no kicks before there are threads)
                self._start_throttler()
            self._cond.notify_all()  # a throttle thread, or a vCPU asleep, looks again

    def _start_throttler(self) -> None:
        if self._throttle and self._throttler is None and self.state is not RunState.STOPPED:
            self._throttler = start_thread(self._throttle_thread, "throttle")

    @property
    def throttle_fraction(self) -> float:
        return self._throttle

    def join(self) -> None:
        for thread in self._threads.values():
            thread.join()

    def _live(self) -> set[int]:
        return {vid for vid, thread in self._threads.items() if thread.is_alive()}

    def _kick_all(self) -> None:
        for vcpu in self.vcpus:
            vcpu.kick()

    def _throttle_thread(self) -> None:
        """Once per period (a slice of running plus the sleep), set how long each vCPU
        sleeps and kick them all; a new fraction starts a new period at once."""
        while True:
            with self._cond:
                fraction = self._throttle
                if not fraction or self.state is RunState.STOPPED:
                    self._throttle_sleep = 0.0
                    self._throttler = None
                    return
                self._throttle_sleep = THROTTLE_SLICE * fraction / (1 - fraction)
                period = self._throttle_sleep + THROTTLE_SLICE
            self._kick_all()
            with self._cond:
                self._cond.wait_for(
                    lambda: self._throttle != fraction or self.state is RunState.STOPPED,  # noqa: B023
                    timeout=period,
                )

    def _throttled(self) -> None:
        """A vCPU's sleep after a throttle kick; a pause or stop, or the throttle's end,
        cuts it short."""
        started = time.monotonic()
        with self._cond:
            self._cond.wait_for(
                lambda: self._interrupt or not self._throttle, timeout=self._throttle_sleep
            )
        self.throttled_seconds += time.monotonic() - started

    # the vCPU thread

    def _thread(self, vcpu: Vcpu) -> None:
        vcpu.thread_id = threading.get_ident()
        try:
            while self._park(vcpu):
                self._run(vcpu)
        except Exception as err:  # a bug or a kernel error must still stop the machine
            log.exception("vcpu%d failed", vcpu.id)
            self.stop(StopReason.ERROR, 1, f"vcpu{vcpu.id}: {err}")
        finally:
            vcpu.thread_id = None
            with self._cond:
                self._cond.notify_all()  # a pause waiting for this thread must look again

    def _park(self, vcpu: Vcpu) -> bool:
        """Wait while paused; False when the machine has stopped."""
        with self._cond:
            while self._pausing and self.state is not RunState.STOPPED:
                self._parked.add(vcpu.id)
                self._cond.notify_all()
                self._cond.wait()
            self._parked.discard(vcpu.id)
            return self.state is not RunState.STOPPED

    def _run(self, vcpu: Vcpu) -> None:
        """The exit loop: the hot path of every PIO/MMIO access the kernel does not handle.
        Returns on KVM_EXIT_INTR when a stop or pause was asked for.

        KVM_RUN and the exit's decoding are C (Vcpu.run, inlined); names are bound to locals and the
        request flag is only checked on KVM_EXIT_INTR (which every kick causes), to keep per-exit
        Python work minimal.
        """
        enter, fd, run_page_ptr = exitloop.lib.pyvmm_vcpu_run, vcpu.fd, vcpu.run_page_ptr
        exit_, complete_read, page = vcpu.exit, vcpu.complete_read, vcpu.run_page
        find_port, find_mmio = self._pio.find, self._mmio.find
        stats = self.exits
        trace, counts, record = stats.trace, stats.per_vcpu[vcpu.id], stats.record
        exit_io, exit_mmio, exit_intr = int(KvmExit.IO), int(KvmExit.MMIO), int(KvmExit.INTR)
        # The last exit's details stay in these locals: a crash's report names the exit before
        # it (KVM may reuse the run page's fields for the crash's own data).
        reason, size, port, port_write, addr, is_write, length = 0, 0, 0, 0, 0, 0, 0
        while True:
            error = enter(fd, run_page_ptr, exit_)  # (Vcpu.run, inlined)
            if error:
                raise IoctlError("KVM_RUN", -error)
            previous, reason = reason, exit_.reason
            stats.count += 1
            if reason == exit_io:
                port, size, port_write = exit_.where, exit_.size, exit_.is_write
                if trace is not None:
                    trace.append((reason, port))
                    record(counts, reason, port)
                found = find_port(port)
                if exit_.count != 1:
                    _port_io(found, port_write, size, port, exit_.count, exit_.data_offset, page)
                elif port_write:
                    if found is not None:
                        _access(found, port - found.base, size, exit_.value)
                elif found is not None:
                    complete_read(_access(found, port - found.base, size, None))
                else:
                    complete_read((1 << (8 * size)) - 1)
            elif reason == exit_mmio:
                addr, length, is_write = exit_.where, exit_.size, exit_.is_write
                if trace is not None:
                    trace.append((reason, addr))
                    record(counts, reason, addr)
                found = find_mmio(addr)
                if length not in (1, 2, 4, 8):
                    continue
                if is_write:
                    if found is not None:
                        _access(found, addr - found.base, length, exit_.value)
                elif found is not None:
                    complete_read(_access(found, addr - found.base, length, None))
                else:
                    complete_read((1 << (8 * length)) - 1)
            elif reason == exit_intr:
                if trace is not None:
                    record(counts, reason, 0)
                if self._interrupt:
                    return
                if self._throttle_sleep:
                    self._throttled()
            else:
                direction = uapi.KVM_EXIT_IO_OUT if port_write else uapi.KVM_EXIT_IO_IN
                last = vcpu_report.LastExit(previous, direction, size, port, is_write, length, addr)
                self._exit_other(vcpu, reason, last)
                if self.state is RunState.STOPPED:
                    return

    def _exit_other(self, vcpu: Vcpu, reason: int, previous: vcpu_report.LastExit) -> None:
        if self.exits.trace is not None:
            self.exits.trace.append((reason, 0))
            ExitStats.record(self.exits.per_vcpu[vcpu.id], reason, 0)
        run = vcpu.exit_struct()
        if reason == KvmExit.SHUTDOWN:
            self._crashed(vcpu, previous, StopReason.TRIPLE_FAULT, "guest triple-faulted (reset)")
        elif reason == KvmExit.SYSTEM_EVENT:
            kind = run.system_event.type
            if kind == uapi.KvmSystemEvent.RESET:
                self.stop(StopReason.RESET, 0, "guest requested a reset")
            elif kind == uapi.KvmSystemEvent.SHUTDOWN:
                self.stop(StopReason.POWEROFF, 0, "guest powered off")
            else:
                self.stop(StopReason.ERROR, 1, f"vcpu{vcpu.id}: system event {kind}")
        elif reason == KvmExit.HLT:
            # Only without an in-kernel LAPIC; pyvmm always has one, so treat as poweroff.
            self.stop(StopReason.POWEROFF, 0, "guest halted")
        elif reason == KvmExit.INTERNAL_ERROR:
            error = vcpu_report.describe_internal_error(run)
            self._crashed(vcpu, previous, StopReason.ERROR, f"KVM internal error, {error}")
        elif reason == KvmExit.FAIL_ENTRY:
            self._crashed(
                vcpu,
                previous,
                StopReason.ERROR,
                "VM entry failed, hardware reason "
                f"{run.fail_entry.hardware_entry_failure_reason:#x}",
            )
        else:
            self.stop(StopReason.ERROR, 1, f"vcpu{vcpu.id}: unhandled KVM exit {exit_name(reason)}")

    def _crashed(
        self, vcpu: Vcpu, previous: vcpu_report.LastExit, reason: StopReason, what: str
    ) -> None:
        """Stop the run on a vCPU's crash, with its report (read now: it is out of KVM_RUN)."""
        crash = vcpu_report.describe_crash(vcpu, previous.describe())
        self.stop(reason, 1, f"vcpu{vcpu.id}: {what}", crashed=vcpu, crash=crash)


def _port_io(
    found: Range | None,
    is_write: int,
    size: int,
    port: int,
    count: int,
    offset: int,
    page: memoryview,
) -> None:
    """String port I/O (rep ins/outs): `count` items of `size` bytes at `offset` in the run page."""
    all_ones = (1 << (8 * size)) - 1
    for pos in range(offset, offset + size * count, size):
        if is_write:
            if found is not None:
                value = int.from_bytes(page[pos : pos + size], "little")
                _access(found, port - found.base, size, value)
        else:
            value = all_ones if found is None else _access(found, port - found.base, size, None)
            page[pos : pos + size] = value.to_bytes(size, "little")


def _access(found: Range, offset: int, size: int, value: int | None) -> int:
    """One device access. A device that raises is a pyvmm bug, but the guest drove it there:
    log it, answer all-ones, keep the VM running."""
    mask = (1 << (8 * size)) - 1
    try:
        if value is None:
            return found.device.read(offset, size) & mask
        found.device.write(offset, size, value)
    except Exception:
        log.exception("%s: access at +%#x (size %d) failed", found.name, offset, size)
    return mask
