"""The one-line report of where a vCPU is: the local APIC's timer and vectors read right."""

from __future__ import annotations

from pyvmm.machine.console import CaptureConsole, ConsoleTail
from pyvmm.machine.vcpu_report import (
    LastExit,
    describe_internal_error,
    describe_timer,
    highest_vector,
)
from pyvmm.machine.vcpu_state import MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE
from pyvmm.uapi import kvm as uapi


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


def test_an_internal_error_is_named_with_its_data() -> None:
    """Suberror 3 (what the lab's nested guests hit) says what KVM could not do, and the data
    words KVM gave (the event being delivered first) are all there, in hex."""
    run = uapi.kvm_run()
    run.internal.suberror = 3
    run.internal.ndata = 3
    run.internal.data[0], run.internal.data[1], run.internal.data[2] = 0x80000B0E, 0x400, 0
    text = describe_internal_error(run)
    assert text.startswith("suberror 3 (event delivery: an exit KVM cannot handle came while")
    assert text.endswith("; data [0x80000b0e, 0x400, 0x0]")
    run.internal.suberror = 99
    run.internal.ndata = 0
    assert describe_internal_error(run) == "suberror 99 (unknown); data []"


def test_a_last_exit_is_described_by_its_kind() -> None:
    io = LastExit(uapi.KvmExit.IO, uapi.KVM_EXIT_IO_OUT, 1, 0x3F8, 0, 4, 0xFEE00000)
    assert io.describe() == "port out 0x3f8 (1 bytes)"
    mmio = LastExit(uapi.KvmExit.MMIO, uapi.KVM_EXIT_IO_OUT, 1, 0x3F8, 0, 4, 0xFEE00000)
    assert mmio.describe() == "MMIO read 0xfee00000 (4 bytes)"
    assert LastExit(uapi.KvmExit.INTR, 0, 0, 0, 0, 0, 0).describe() == "INTR"
    assert LastExit(0, 0, 0, 0, 0, 0, 0).describe() == "none (this was its first)"


def test_the_console_tail_keeps_the_last_lines_and_passes_everything_on() -> None:
    seen = CaptureConsole()
    tail = ConsoleTail(seen, keep=64)
    for i in range(100):
        for byte in f"line {i}\r\n".encode():
            tail.write(bytes([byte]))  # as the UART sends it: a byte an exit
    tail.write(b"half a li")
    assert tail.lines(3) == ["line 98", "line 99", "half a li"]
    assert seen.text.endswith("line 99\r\nhalf a li")
    assert seen.text.count("\n") == 100
