"""The KVM state components (pyvmm.machine.vcpu_state, pyvmm.machine.vm_state) against the host's
/dev/kvm: a guest's state saved, restored into the same VM and into another, as plain data, and
refused whole when it does not fit.

Two values in that state are counters that run while the VM exists, stopped or not: each vCPU's
TSC and the VM's kvmclock. They cannot compare equal across a save, a restore and another save;
`assert_same_state` checks that each one carried on from its saved value by no more than the
time that passed, then compares everything else exactly.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from guestbuild import guest, requires_kvm

from pyvmm.board.machine import Machine, StopReason
from pyvmm.machine.component import Components
from pyvmm.machine.console import CaptureConsole
from pyvmm.machine.state import StateError, from_plain, to_plain
from pyvmm.machine.vcpu_state import (
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    MSRS_PER_CALL,
    VcpuComponent,
    VcpuState,
)
from pyvmm.machine.vm_state import (
    ClockComponent,
    ClockState,
    IrqchipComponent,
    IrqchipState,
    PitComponent,
    PitState,
)
from pyvmm.uapi import kvm as uapi

pytestmark = [pytest.mark.kvm, requires_kvm]

MSR_IA32_SYSENTER_CS = 0x174
MSR_STAR = 0xC0000081
MSR_UNKNOWN = 0x4B564DFF  # in KVM's own MSR range, but not one KVM knows
APIC_TPR = 0x80
APIC_SVR = 0xF0
APIC_LVTT = 0x320
APIC_LVT_TSC_DEADLINE = 0b10 << 17
IOAPIC_PIN = 10  # the interrupts guest routes it to vector 0x41, see guests/README.md
IOAPIC_VECTOR = 0x41
IOAPIC_MASKED = 1 << 16
NS = 1_000_000_000
SLACK_NS = NS // 2  # scheduling noise allowed on top of the time measured


def _machine() -> Machine:
    return Machine(mem_size=16 << 20, vcpus=2, console=CaptureConsole())


@pytest.fixture
def ran() -> Iterator[Machine]:
    """A machine whose interrupts guest has set up its IDT, LAPIC, IOAPIC and PICs and halted
    waiting for an interrupt (vCPU 1 still waits for its SIPI); the run is over."""
    with _machine() as machine:
        machine.load_elf(str(guest("interrupts")))
        console = machine.console
        assert isinstance(console, CaptureConsole)

        def stop_once_halted() -> None:
            console.wait_for("ready", 30)
            # After the line the guest runs a few dozen instructions to its `sti; hlt`; stopping
            # sooner would save a runnable vCPU (test_saved_state_is_the_guests checks it).
            time.sleep(0.5)
            machine.stop(StopReason.STOPPED, 7)

        stopper = threading.Thread(target=stop_once_halted)
        stopper.start()
        result = machine.run(timeout=60)
        stopper.join()
        assert (result.reason, result.exit_code) == (StopReason.STOPPED, 7)
        yield machine


@pytest.fixture
def finished() -> Iterator[Machine]:
    """A machine whose hello guest has run to its end."""
    with _machine() as machine:
        machine.load_elf(str(guest("hello")))
        result = machine.run(timeout=60)
        assert (result.reason, result.exit_code) == (StopReason.DEBUG_EXIT, 0)
        yield machine


@pytest.fixture
def fresh() -> Iterator[Machine]:
    """Another VM, built the same way, that has never run."""
    with _machine() as machine:
        yield machine


def components(machine: Machine) -> Components:
    """The KVM state of `machine` as the machine registers it, in restore order."""
    parts = Components()
    for cid in ("irqchip", "pit", "clock", *(f"vcpu{vcpu.id}" for vcpu in machine.vcpus)):
        parts.add(cid, machine.components[cid])
    return parts


def save_each(parts: Components) -> dict[str, Any]:
    return {cid: parts[cid].save() for cid in parts}  # type: ignore[attr-defined]


def assert_same_state(before: dict[str, Any], after: dict[str, Any], elapsed_ns: int) -> None:
    """`after` is `before`, the TSCs and kvmclock having run on by at most `elapsed_ns`."""
    assert after.keys() == before.keys()
    for cid, state in after.items():
        saved = before[cid]
        if isinstance(state, VcpuState):
            limit = saved.tsc_khz * 1000 * (elapsed_ns + SLACK_NS) // NS
            ran_on = state.msrs[MSR_IA32_TSC] - saved.msrs[MSR_IA32_TSC]
            assert 0 <= ran_on <= limit, f"{cid}: TSC moved by {ran_on} cycles"
            state = dataclasses.replace(state, msrs={**state.msrs, MSR_IA32_TSC: 0})
            saved = dataclasses.replace(saved, msrs={**saved.msrs, MSR_IA32_TSC: 0})
        elif isinstance(state, ClockState):
            ran_on = state.clock - saved.clock
            assert 0 <= ran_on <= elapsed_ns + SLACK_NS, f"kvmclock moved by {ran_on} ns"
            state = dataclasses.replace(state, clock=saved.clock, realtime=saved.realtime)
        assert state == saved, cid


def ioapic(machine: Machine) -> uapi.kvm_ioapic_state:
    raw = machine.vm.get_irqchip(uapi.KVM_IRQCHIP_IOAPIC)
    return uapi.kvm_ioapic_state.from_buffer_copy(raw)


def pic(machine: Machine, chip: int) -> uapi.kvm_pic_state:
    return uapi.kvm_pic_state.from_buffer_copy(machine.vm.get_irqchip(chip))


def lapic_reg(lapic: bytes, offset: int) -> int:
    return int.from_bytes(lapic[offset : offset + 4], "little")


def with_lapic_reg(lapic: bytes, offset: int, value: int) -> bytes:
    return lapic[:offset] + value.to_bytes(4, "little") + lapic[offset + 4 :]


def test_saved_state_is_the_guests(ran: Machine) -> None:
    """What was saved is what the interrupts guest set up, not KVM's reset values."""
    state = save_each(components(ran))
    boot, ap = state["vcpu0"], state["vcpu1"]
    assert boot.mp_state == uapi.KvmMpState.HALTED  # in hlt, waiting for the MSI
    assert ap.mp_state == uapi.KvmMpState.UNINITIALIZED
    assert lapic_reg(boot.lapic, APIC_SVR) == 0x1FF  # enabled, spurious vector 0xFF
    redirection = uapi.kvm_ioapic_state.from_buffer_copy(state["irqchip"].ioapic).redirtbl
    assert redirection[IOAPIC_PIN].bits & (0xFF | IOAPIC_MASKED) == IOAPIC_VECTOR
    master = uapi.kvm_pic_state.from_buffer_copy(state["irqchip"].pic_master)
    slave = uapi.kvm_pic_state.from_buffer_copy(state["irqchip"].pic_slave)
    assert (master.irq_base, master.imr, slave.irq_base, slave.imr) == (0x20, 0xFF, 0x28, 0xFF)
    regs = uapi.kvm_regs.from_buffer_copy(boot.regs)
    assert regs.rip >= 0x100000  # in the guest's code, linked at 1 MiB
    assert len(boot.xsave) == ran.vcpus[0].xsave_size() >= ctypes.sizeof(uapi.kvm_xsave)
    probe = VcpuComponent(ran.vcpus[0]).msr_probe
    assert set(boot.msrs) == set(probe.readable)
    assert {*probe.readable, *probe.unreadable} == {*ran.system.msr_index_list(), MSR_IA32_TSC}
    assert {MSR_IA32_TSC, MSR_IA32_SYSENTER_CS, MSR_STAR} <= set(boot.msrs)


def test_restore_into_the_same_vm_gives_back_the_same_state(ran: Machine) -> None:
    parts = components(ran)
    start = time.monotonic_ns()
    saved = parts.save_all()
    parts.restore_all(saved)
    assert_same_state(parts.decode(saved), save_each(parts), time.monotonic_ns() - start)


def test_restore_into_another_vm_carries_the_state(ran: Machine, fresh: Machine) -> None:
    boot = ran.vcpus[0]
    regs = boot.get_regs()
    regs.rbx = 0x1234_5678_9ABC_DEF0
    boot.set_regs(regs)
    boot.set_msrs({MSR_IA32_SYSENTER_CS: 0x10, MSR_STAR: 0x0023_0010_0000_0000})
    debug = boot.get_debugregs()
    debug.db[:] = [0x1000, 0x2000, 0x3000, 0x4000]
    debug.dr7 = 0x401  # bit 10 is always 1; L0 enables breakpoint 0
    boot.set_debugregs(debug)
    boot.set_lapic(with_lapic_reg(boot.get_lapic(), APIC_TPR, 0x20))
    start = time.monotonic_ns()
    saved = components(ran).save_all()

    target = fresh.vcpus[0]
    assert target.get_regs().rbx != 0x1234_5678_9ABC_DEF0
    assert ioapic(fresh).redirtbl[IOAPIC_PIN].bits & IOAPIC_MASKED
    parts = components(fresh)
    parts.restore_all(saved)
    assert_same_state(parts.decode(saved), save_each(parts), time.monotonic_ns() - start)

    # ...and read back through the plain ioctls, each change is there
    assert target.get_regs().rbx == 0x1234_5678_9ABC_DEF0
    assert target.get_msrs([MSR_IA32_SYSENTER_CS, MSR_STAR]) == {
        MSR_IA32_SYSENTER_CS: 0x10,
        MSR_STAR: 0x0023_0010_0000_0000,
    }
    debug = target.get_debugregs()
    assert (list(debug.db), debug.dr7) == ([0x1000, 0x2000, 0x3000, 0x4000], 0x401)
    assert lapic_reg(target.get_lapic(), APIC_TPR) == 0x20
    assert target.get_sregs().cr8 == 2  # CR8 is the TPR's priority class
    assert target.get_mp_state() == uapi.KvmMpState.HALTED
    assert fresh.vcpus[1].get_mp_state() == uapi.KvmMpState.UNINITIALIZED
    entry = ioapic(fresh).redirtbl[IOAPIC_PIN].bits
    assert entry & (0xFF | IOAPIC_MASKED) == IOAPIC_VECTOR
    assert entry == ioapic(ran).redirtbl[IOAPIC_PIN].bits
    master = pic(fresh, uapi.KVM_IRQCHIP_PIC_MASTER)
    slave = pic(fresh, uapi.KVM_IRQCHIP_PIC_SLAVE)
    assert (master.irq_base, master.imr, slave.irq_base, slave.imr) == (0x20, 0xFF, 0x28, 0xFF)


def test_an_armed_tsc_deadline_timer_survives_into_another_vm(ran: Machine, fresh: Machine) -> None:
    """KVM ignores a TSC-deadline write unless the LAPIC timer is in TSC-deadline mode: restoring
    the MSRs before the LAPIC would lose the deadline."""
    boot = ran.vcpus[0]
    lvtt = APIC_LVT_TSC_DEADLINE | 0xEC
    boot.set_lapic(with_lapic_reg(boot.get_lapic(), APIC_LVTT, lvtt))
    tsc = boot.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
    deadline = tsc + boot.get_tsc_khz() * 1000 * 3600  # an hour on: it does not fire here
    boot.set_msrs({MSR_IA32_TSC_DEADLINE: deadline})
    saved = components(ran).save_all()

    target = fresh.vcpus[0]
    assert target.get_msrs([MSR_IA32_TSC_DEADLINE]) == {MSR_IA32_TSC_DEADLINE: 0}
    components(fresh).restore_all(saved)
    assert lapic_reg(target.get_lapic(), APIC_LVTT) == lvtt
    assert target.get_msrs([MSR_IA32_TSC_DEADLINE]) == {MSR_IA32_TSC_DEADLINE: deadline}


def test_a_halted_bsp_at_the_reset_vector_stays_halted(fresh: Machine) -> None:
    """KVM_SET_SREGS makes a BSP at the reset vector runnable: the MP state goes after it."""
    with _machine() as source:
        boot = source.vcpus[0]
        assert boot.get_regs().rip == 0xFFF0  # never run: KVM's reset state, real mode
        boot.set_mp_state(uapi.KvmMpState.HALTED)
        saved = components(source).save_all()
    components(fresh).restore_all(saved)
    assert fresh.vcpus[0].get_mp_state() == uapi.KvmMpState.HALTED


def test_a_pending_exception_survives_into_another_vm(fresh: Machine) -> None:
    """KVM_SET_REGS drops a pending exception: the events go after it. (Pending, as opposed to
    injected, exists for userspace only with KVM_CAP_EXCEPTION_PAYLOAD, enabled here.)"""
    if not fresh.vm.check_extension(uapi.KvmCap.EXCEPTION_PAYLOAD):
        pytest.skip("this KVM has no KVM_CAP_EXCEPTION_PAYLOAD")
    with _machine() as source:
        for machine in (source, fresh):
            machine.vm.enable_cap(uapi.KvmCap.EXCEPTION_PAYLOAD, 1)
        boot = source.vcpus[0]
        events = boot.get_vcpu_events()
        events.flags |= uapi.KVM_VCPUEVENT_VALID_PAYLOAD
        events.exception.pending = events.exception.has_error_code = 1
        events.exception.nr, events.exception.error_code = 13, 0x18  # #GP on selector 0x18
        boot.set_vcpu_events(events)
        saved = components(source).save_all()
    components(fresh).restore_all(saved)
    exception = fresh.vcpus[0].get_vcpu_events().exception
    assert (exception.pending, exception.nr, exception.error_code) == (1, 13, 0x18)


def test_every_state_survives_plain_data(ran: Machine) -> None:
    states = save_each(components(ran))
    kinds = {type(state) for state in states.values()}
    assert kinds == {VcpuState, IrqchipState, PitState, ClockState}
    for cid, state in states.items():
        plain = to_plain(state)
        assert isinstance(plain, dict)
        assert from_plain(type(state), plain, cid) == state


def program_pit_channel0(machine: Machine, count: int) -> None:
    """Channel 0 as Linux programs it for its tick: rate generator (mode 2), LSB then MSB."""
    pit = machine.vm.get_pit2()
    channel = pit.channels[0]
    channel.mode = 2
    channel.count = count
    channel.rw_mode = channel.read_state = channel.write_state = 3
    machine.vm.set_pit2(pit)


def test_programmed_pit_carries_into_another_vm_and_runs(fresh: Machine) -> None:
    with _machine() as source:
        program_pit_channel0(source, 1193)  # 1 ms at 1.193182 MHz
        saved = PitComponent(source.vm).save()
    state = uapi.kvm_pit_state2.from_buffer_copy(saved.pit)
    assert [c.count_load_time for c in state.channels] == [0, 0, 0]

    before = fresh.vm.get_pit2().channels[0]
    assert (before.count, before.mode) == (0x10000, 0xFF)  # KVM's reset: no mode, no timer
    PitComponent(fresh.vm).restore(saved)
    channel = fresh.vm.get_pit2().channels[0]
    assert (channel.count, channel.mode, channel.rw_mode) == (1193, 2, 3)
    # the restored channel runs: its first tick raises IRQ 0 at the master PIC
    deadline = time.monotonic() + 5
    while not pic(fresh, uapi.KVM_IRQCHIP_PIC_MASTER).irr & 1:
        assert time.monotonic() < deadline, "the restored PIT never ticked"
        time.sleep(0.001)
    assert PitComponent(fresh.vm).save() == saved


def test_restored_clock_carries_on_from_the_saved_value(fresh: Machine) -> None:
    with _machine() as source:
        source.vm.set_clock(uapi.kvm_clock_data(clock=1000 * NS))
        start = time.monotonic_ns()
        saved = ClockComponent(source.vm).save()
    assert 1000 * NS <= saved.clock < 1001 * NS
    assert fresh.vm.get_clock().clock < 1000 * NS  # a new VM's kvmclock starts near 0
    ClockComponent(fresh.vm).restore(saved)
    clock = fresh.vm.get_clock().clock
    assert saved.clock <= clock <= saved.clock + time.monotonic_ns() - start + SLACK_NS


@pytest.mark.parametrize("realtime_flag", [True, False], ids=["realtime", "no-realtime"])
def test_clock_counts_the_time_spent_saved_when_it_has_a_realtime_stamp(
    fresh: Machine, realtime_flag: bool
) -> None:
    """A state saved 30 s ago (by its realtime stamp): with KVM_CLOCK_REALTIME the clock moves on
    by those 30 s; without, it resumes at the saved value."""
    now = time.time_ns()
    saved = ClockState(
        clock=500 * NS,
        flags=uapi.KVM_CLOCK_REALTIME if realtime_flag else 0,
        realtime=now - 30 * NS,
    )
    ClockComponent(fresh.vm).restore(saved)
    moved = fresh.vm.get_clock().clock - saved.clock - (30 * NS if realtime_flag else 0)
    assert 0 <= moved <= time.time_ns() - now + SLACK_NS


def test_msr_probe_keeps_the_msrs_after_an_unreadable_one(
    finished: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    vcpu = finished.vcpus[0]
    listed = finished.system.msr_index_list()
    middle = len(listed) // 2
    with_unknown = [*listed[:middle], MSR_UNKNOWN, *listed[middle:]]
    monkeypatch.setattr(finished.system, "msr_index_list", lambda: with_unknown)
    part = VcpuComponent(vcpu)
    reads: list[int] = []
    get_msrs = vcpu.get_msrs

    def counted(indices: list[int]) -> dict[int, int]:
        reads.append(len(indices))
        return get_msrs(indices)

    monkeypatch.setattr(vcpu, "get_msrs", counted)
    state = part.save()
    assert part.msr_probe.unreadable == (MSR_UNKNOWN,)
    # those after the unknown one are there too, in KVM's order
    assert list(state.msrs) == list(dict.fromkeys([*listed, MSR_IA32_TSC]))
    reads.clear()
    part.save()
    assert len(reads) == -(-len(listed) // MSRS_PER_CALL)  # no probing again


def test_restore_refuses_msrs_this_vcpu_does_not_have(finished: Machine) -> None:
    part = VcpuComponent(finished.vcpus[0])
    state = part.save()
    bad = dataclasses.replace(state, msrs={**state.msrs, MSR_UNKNOWN: 1})
    with pytest.raises(StateError, match=f"{MSR_UNKNOWN:#x}"):
        part.restore(bad)


def test_restore_refuses_a_tsc_it_cannot_run_at(finished: Machine) -> None:
    part = VcpuComponent(finished.vcpus[0])
    state = part.save()
    faster = dataclasses.replace(state, tsc_khz=state.tsc_khz * 2)
    if finished.vm.check_extension(uapi.KvmCap.TSC_CONTROL):
        part.restore(faster)
        assert finished.vcpus[0].get_tsc_khz() == faster.tsc_khz
    else:
        # KVM scales a guest's TSC with the CPU's TSC multiplier (VMX/SVM); a PVM host has
        # neither (no vmx/svm in its cpuinfo), so KVM_CAP_TSC_CONTROL is 0 and the state is
        # refused rather than run at the wrong rate.
        with pytest.raises(StateError, match="cannot scale"):
            part.restore(faster)


VCPU_BLOBS = ("regs", "sregs", "xsave", "xcrs", "lapic", "vcpu_events", "debugregs")


@pytest.mark.parametrize("grow", [-1, 8], ids=["short", "long"])
@pytest.mark.parametrize("field", VCPU_BLOBS)
def test_vcpu_blob_of_the_wrong_size_is_refused_before_any_write(
    finished: Machine, field: str, grow: int
) -> None:
    """The state also changes rbx and STAR, which restore would write first: nothing is."""
    part = VcpuComponent(finished.vcpus[0])
    start = time.monotonic_ns()
    before = part.save()
    regs = uapi.kvm_regs.from_buffer_copy(before.regs)
    regs.rbx ^= 0xFFFF
    blob = getattr(before, field)
    blob = blob[:grow] if grow < 0 else blob + bytes(grow)
    bad = dataclasses.replace(
        before, regs=bytes(regs), msrs={**before.msrs, MSR_STAR: 0x0023_0010_0000_0000}
    )
    bad = dataclasses.replace(bad, **{field: blob})
    with pytest.raises(StateError) as refused:
        part.restore(bad)
    message = str(refused.value)
    assert f"saved {field} is {len(blob)} bytes" in message
    assert "\n" not in message
    assert_same_state({"vcpu0": before}, {"vcpu0": part.save()}, time.monotonic_ns() - start)


@pytest.mark.parametrize("field", ["pic_master", "pic_slave", "ioapic"])
def test_irqchip_blob_of_the_wrong_size_is_refused_before_any_write(
    ran: Machine, field: str
) -> None:
    """The state also unmasks both PICs and masks IOAPIC pin 10: none of it is written."""
    part = IrqchipComponent(ran.vm)
    before = part.save()
    master = uapi.kvm_pic_state.from_buffer_copy(before.pic_master)
    slave = uapi.kvm_pic_state.from_buffer_copy(before.pic_slave)
    master.imr = slave.imr = 0
    chip = uapi.kvm_ioapic_state.from_buffer_copy(before.ioapic)
    chip.redirtbl[IOAPIC_PIN].bits |= IOAPIC_MASKED
    bad = IrqchipState(bytes(master), bytes(slave), bytes(chip))
    bad = dataclasses.replace(bad, **{field: getattr(bad, field)[:-1]})
    with pytest.raises(StateError, match=f"saved {field} is"):
        part.restore(bad)
    assert part.save() == before


def test_pit_and_clock_that_do_not_fit_are_refused_before_any_write(finished: Machine) -> None:
    pit = PitComponent(finished.vm)
    before = pit.save()
    with pytest.raises(StateError, match="kvm_pit_state2"):
        pit.restore(PitState(before.pit + bytes(4)))
    assert pit.save() == before

    clock = ClockComponent(finished.vm)
    start = clock.save()
    with pytest.raises(StateError, match="saved clock"):
        clock.restore(dataclasses.replace(start, clock=1 << 64))
    assert start.clock <= finished.vm.get_clock().clock < start.clock + 10 * NS
