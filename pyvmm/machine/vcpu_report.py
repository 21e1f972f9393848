"""Where a paused vCPU is, in one line: what a kernel developer asks first of a guest that hung.

The instruction pointer, whether the vCPU is halted and takes interrupts, the highest vector
the local APIC has pending (IRR) and in service (ISR), and its timer: masked, or when it fires
next. A halted vCPU with interrupts on and a vector pending, or with a timer that should have
fired, points at the interrupt path (the host's or pyvmm's); one spinning with a timer far
ahead, at the guest.
"""

from __future__ import annotations

from pyvmm.kvm.vcpu import Vcpu
from pyvmm.machine.vcpu_state import MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE
from pyvmm.uapi import kvm as uapi

_RFLAGS_IF = 1 << 9
# Local APIC registers (offsets into KVM_GET_LAPIC's page, as in the SDM)
_ISR, _IRR = 0x100, 0x200
_LVT_TIMER, _TIMER_INITIAL, _TIMER_CURRENT = 0x320, 0x380, 0x390
_LVT_MASKED = 1 << 16
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
