"""The one-line report of where a vCPU is: the local APIC's timer and vectors read right."""

from __future__ import annotations

from pyvmm.machine.vcpu_report import describe_timer, highest_vector
from pyvmm.machine.vcpu_state import MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE


def lapic(**registers: int) -> bytes:
    """A KVM_GET_LAPIC page with the given registers (name_offset=value)."""
    page = bytearray(1024)
    for name, value in registers.items():
        offset = int(name.removeprefix("r"), 16)
        page[offset : offset + 4] = value.to_bytes(4, "little")
    return bytes(page)


def test_timer_modes() -> None:
    assert describe_timer(lapic(r320=0x10030), {}, 1000) == "timer masked (one-shot)"
    assert describe_timer(lapic(r320=0x30), {}, 1000) == "timer one-shot, not armed (vector 0x30)"
    armed = lapic(r320=0x20030, r380=1000, r390=250)
    assert describe_timer(armed, {}, 1000) == "timer periodic, 250 bus ticks left (vector 0x30)"
    deadline = lapic(r320=0x400EC)
    msrs = {MSR_IA32_TSC: 5_000_000, MSR_IA32_TSC_DEADLINE: 5_000_000 + 2_500_000}
    assert describe_timer(deadline, msrs, 1_000_000) == (
        "timer tsc-deadline due in 2.500 ms (vector 0xec)"
    )
    overdue = {MSR_IA32_TSC: 9_000_000, MSR_IA32_TSC_DEADLINE: 8_000_000}
    assert describe_timer(deadline, overdue, 1_000_000) == (
        "timer tsc-deadline due in -1.000 ms (vector 0xec)"
    )
    assert describe_timer(deadline, {MSR_IA32_TSC: 1}, 1_000_000) == (
        "timer tsc-deadline, not armed (vector 0xec)"
    )


def test_highest_vector_of_a_bitmap() -> None:
    assert highest_vector(lapic(), 0x200) is None
    assert highest_vector(lapic(r200=1 << 5), 0x200) == 5
    # vector 0xec: word 7 (0xe0-0xff), bit 12; a lower one in word 1 does not hide it
    assert highest_vector(lapic(r210=1, r270=1 << 12), 0x200) == 0xEC
