"""Where a paused vCPU is, in one line: what a kernel developer asks first of a guest that hung.

The instruction pointer, whether the vCPU is halted and takes interrupts, the highest vector
the local APIC has pending (IRR) and in service (ISR), and its timer: masked, or when it fires
next. A halted vCPU with interrupts on and a vector pending, or with a timer that should have
fired, points at the interrupt path (the host's or pyvmm's); one spinning with a timer far
ahead, at the guest.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.kvm.vcpu import Vcpu
from pyvmm.machine.exits import exit_name
from pyvmm.machine.vcpu_state import MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE
from pyvmm.uapi import kvm as uapi

_RFLAGS_IF = 1 << 9
# Local APIC registers (offsets into KVM_GET_LAPIC's page, as in the SDM)
_ISR, _IRR = 0x100, 0x200
_LVT_TIMER, _TIMER_INITIAL, _TIMER_CURRENT = 0x320, 0x380, 0x390
_LVT_MASKED = 1 << 16
_RESET_RIP, _RESET_CS_BASE = 0xFFF0, 0xFFFF_0000  # where a vCPU starts after RESET or INIT
_CR0_PE = 1 << 0
_TIMER_MODES = {0: "one-shot", 1: "periodic", 2: "tsc-deadline"}


def _register(lapic: bytes, offset: int) -> int:
    return int.from_bytes(lapic[offset : offset + 4], "little")


def highest_vector(lapic: bytes, base: int) -> int | None:
    """The highest vector set in an 8 x 32-bit APIC bitmap (IRR, ISR), or None."""
    for word in range(7, -1, -1):
        bits = _register(lapic, base + 16 * word)
        if bits:
            return word * 32 + bits.bit_length() - 1
    return None


def describe_timer(lapic: bytes, msrs: dict[int, int], tsc_khz: int) -> str:
    lvt = _register(lapic, _LVT_TIMER)
    mode = _TIMER_MODES.get((lvt >> 17) & 3, "reserved-mode")
    vector = lvt & 0xFF
    if lvt & _LVT_MASKED:
        return f"timer masked ({mode})"
    if mode == "tsc-deadline":
        deadline = msrs.get(MSR_IA32_TSC_DEADLINE, 0)
        if not deadline:
            return f"timer tsc-deadline, not armed (vector {vector:#x})"
        ahead = (deadline - msrs.get(MSR_IA32_TSC, 0)) / max(tsc_khz, 1)
        return f"timer tsc-deadline due in {ahead:.3f} ms (vector {vector:#x})"
    if not _register(lapic, _TIMER_INITIAL):
        return f"timer {mode}, not armed (vector {vector:#x})"
    left = _register(lapic, _TIMER_CURRENT)
    return f"timer {mode}, {left} bus ticks left (vector {vector:#x})"


def describe(vcpu: Vcpu) -> str:
    """One line on a vCPU that is not in KVM_RUN (a paused or stopped machine's)."""
    regs = vcpu.get_regs()
    mp_state = uapi.KvmMpState(vcpu.get_mp_state()).name.lower()
    lapic = vcpu.get_lapic()
    msrs = vcpu.get_msrs([MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE])
    interrupts = "on" if regs.rflags & _RFLAGS_IF else "off"
    parts = [f"vcpu{vcpu.id} {mp_state} at rip {regs.rip:#x}, interrupts {interrupts}"]
    for name, base in (("pending", _IRR), ("in service", _ISR)):
        vector = highest_vector(lapic, base)
        if vector is not None:
            parts.append(f"vector {vector:#x} {name}")
    parts.append(describe_timer(lapic, msrs, vcpu.get_tsc_khz()))
    return ", ".join(parts)


# -- a crashed vCPU ----------------------------------------------------------------------------

EXCEPTIONS = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
    10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
    19: "#XM", 20: "#VE", 21: "#CP",
}  # fmt: skip

#: KVM_INTERNAL_ERROR_* (linux/kvm.h), in words.
INTERNAL_SUBERRORS = {
    1: "emulation: KVM's instruction emulator could not emulate an instruction",
    2: "simultaneous exception: an exception while KVM was delivering another",
    3: "event delivery: an exit KVM cannot handle came while the vCPU delivered an interrupt or "
    "exception (its IDT, GDT or stack in memory without a RAM slot, say)",
    4: "unexpected exit reason: the hardware exited for a reason KVM does not handle",
}


def exception_name(vector: int) -> str:
    return f"{EXCEPTIONS.get(vector, 'exception')} (vector {vector})"


@dataclass(frozen=True)
class LastExit:
    """The exit pyvmm handled before the one that ended a run: its reason, and the details of
    the last port and MMIO accesses (the exit loop's own locals, free to keep)."""

    reason: int
    direction: int
    size: int
    port: int
    is_write: int
    length: int
    addr: int

    def describe(self) -> str:
        if self.reason == uapi.KvmExit.IO:
            way = "out" if self.direction == uapi.KVM_EXIT_IO_OUT else "in"
            return f"port {way} {self.port:#x} ({self.size} bytes)"
        if self.reason == uapi.KvmExit.MMIO:
            way = "write" if self.is_write else "read"
            return f"MMIO {way} {self.addr:#x} ({self.length} bytes)"
        if self.reason == 0:
            return "none (this was its first)"
        return exit_name(self.reason)


def describe_crash(vcpu: Vcpu, last_exit: str) -> tuple[str, ...]:
    """What a developer needs of a vCPU that just crashed (a triple fault, a KVM internal
    error), read while it is out of KVM_RUN: registers, control registers and descriptor
    tables, the event KVM had in flight, and the last exit pyvmm handled for it. On AMD, KVM
    re-initialises a vCPU at a triple fault (the VMCB is undefined after a shutdown): its
    registers then show the reset state, which the first line says."""
    try:
        regs, sregs, events = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_vcpu_events()
    except OSError as err:
        unreadable = f"vcpu{vcpu.id}: its state cannot be read ({err})"
        return (f"{unreadable}; last exit to pyvmm: {last_exit}",)
    reset = (
        regs.rip == _RESET_RIP
        and sregs.cs.base == _RESET_CS_BASE
        and not sregs.cr0 & _CR0_PE
        and not sregs.efer
    )
    lines = [
        f"vcpu{vcpu.id} rip={regs.rip:#x} rsp={regs.rsp:#x} rflags={regs.rflags:#x} "
        f"cs={sregs.cs.selector:#x}"
        + (" (the reset state: KVM on AMD discards the state at a triple fault)" if reset else ""),
        f"vcpu{vcpu.id} cr0={sregs.cr0:#x} cr2={sregs.cr2:#x} cr3={sregs.cr3:#x} "
        f"cr4={sregs.cr4:#x} efer={sregs.efer:#x}",
        f"vcpu{vcpu.id} idt={sregs.idt.base:#x}+{sregs.idt.limit:#x} "
        f"gdt={sregs.gdt.base:#x}+{sregs.gdt.limit:#x} tr={sregs.tr.selector:#x}",
    ]
    flight = []
    exc = events.exception
    if exc.injected or exc.pending:
        code = f", error code {exc.error_code:#x}" if exc.has_error_code else ""
        flight.append(f"{exception_name(exc.nr)} {'injected' if exc.injected else 'pending'}{code}")
    if events.interrupt.injected:
        flight.append(f"interrupt vector {events.interrupt.nr:#x} injected")
    if events.nmi.injected or events.nmi.pending:
        flight.append("NMI " + ("injected" if events.nmi.injected else "pending"))
    lines.append(
        f"vcpu{vcpu.id} in flight: {', '.join(flight) or 'no event'}; "
        f"last exit to pyvmm: {last_exit}"
    )
    return tuple(lines)


def describe_internal_error(run: uapi.kvm_run) -> str:
    """KVM_EXIT_INTERNAL_ERROR's suberror in words and its data words (for event delivery,
    KVM's exit information: the event being delivered, the exit reason and qualification)."""
    internal = run.internal
    words = ", ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
    what = INTERNAL_SUBERRORS.get(internal.suberror, "unknown")
    return f"suberror {internal.suberror} ({what}); data [{words}]"
