"""The VM-wide state KVM keeps in the kernel, as three components: the interrupt controllers,
the PIT, and kvmclock.

- `IrqchipComponent`: the in-kernel 8259 PICs (master and slave: vector bases, masks, requests
  and in-service bits, trigger modes) and the IOAPIC (its redirection table: which pin goes to
  which vector and CPU; pending requests). KVM_GET_IRQCHIP / KVM_SET_IRQCHIP, one chip at a time.
- `PitComponent`: the in-kernel 8254 (each channel's count, mode, latches, gate; the HPET-legacy
  and speaker flags). KVM_GET_PIT2 / KVM_SET_PIT2.
- `ClockComponent`: the VM's kvmclock, the nanosecond count that guests read through the
  kvmclock MSRs' shared pages. KVM_GET_CLOCK / KVM_SET_CLOCK.

Order: the machine registers these before the vCPUs, irqchip first, then the PIT, then the
clock. KVM_SET_PIT2 re-arms channel 0's timer, whose ticks go into the PIC and the IOAPIC, so
those should already hold their restored routing and masks; the clock only sets the VM's
kvmclock offset, which the vCPUs pick up when they next enter the guest. (Firecracker's
ArchVm::restore_state, src/vmm/src/arch/x86_64/vm.rs, sets the PIT, the clock, then the three
chips; none of them depends on the vCPUs.) As for the vCPUs, the machine must be paused while
these are saved or restored.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

from pyvmm.kvm.vm import Vm
from pyvmm.machine.state import require_size, require_uint
from pyvmm.uapi import kvm as uapi


@dataclass
class IrqchipState:
    """The in-kernel interrupt controllers; byte fields are the kernel structs named beside
    them (the chips' own structs, not the 512-byte union KVM_GET_IRQCHIP carries them in)."""

    VERSION: ClassVar[int] = 1

    pic_master: bytes  # struct kvm_pic_state
    pic_slave: bytes  # struct kvm_pic_state
    ioapic: bytes  # struct kvm_ioapic_state


_CHIPS: tuple[tuple[str, int, type[ctypes.Structure]], ...] = (
    ("pic_master", uapi.KVM_IRQCHIP_PIC_MASTER, uapi.kvm_pic_state),
    ("pic_slave", uapi.KVM_IRQCHIP_PIC_SLAVE, uapi.kvm_pic_state),
    ("ioapic", uapi.KVM_IRQCHIP_IOAPIC, uapi.kvm_ioapic_state),
)


class IrqchipComponent:
    """Save and restore the PICs and the IOAPIC (master, slave, IOAPIC, in that order)."""

    state_type: ClassVar[type[IrqchipState]] = IrqchipState

    def __init__(self, vm: Vm) -> None:
        self.vm = vm

    def save(self) -> IrqchipState:
        chips = {
            field: self.vm.get_irqchip(chip_id)[: ctypes.sizeof(struct)]
            for field, chip_id, struct in _CHIPS
        }
        return IrqchipState(**chips)

    def check(self, state: IrqchipState) -> None:
        """StateError if a chip's bytes do not fit this kernel's struct."""
        for field, _, struct in _CHIPS:
            blob = getattr(state, field)
            require_size(f"irqchip: saved {field}", blob, ctypes.sizeof(struct), struct.__name__)

    def restore(self, state: IrqchipState) -> None:
        self.check(state)
        for field, chip_id, _ in _CHIPS:
            self.vm.set_irqchip(chip_id, getattr(state, field))


@dataclass
class PitState:
    """The in-kernel PIT: struct kvm_pit_state2, with every channel's count_load_time 0.

    count_load_time is a host CLOCK_MONOTONIC stamp, meaningless in another VM or process, and
    KVM_SET_PIT2 never uses it: it reloads each channel's count, re-arming channel 0's timer
    for the modes that run one (channel 0 counts by that timer, not by the stamp) and stamping
    channels 1 and 2 with the host's time then. So a restored PIT counts from its reload value
    again: KVM keeps no count of how far a channel had got.
    """

    VERSION: ClassVar[int] = 1

    pit: bytes  # struct kvm_pit_state2


class PitComponent:
    state_type: ClassVar[type[PitState]] = PitState

    def __init__(self, vm: Vm) -> None:
        self.vm = vm

    def save(self) -> PitState:
        pit = self.vm.get_pit2()
        for channel in pit.channels:
            channel.count_load_time = 0
        return PitState(bytes(pit))

    def check(self, state: PitState) -> None:
        """StateError if the bytes do not fit this kernel's struct kvm_pit_state2."""
        size = ctypes.sizeof(uapi.kvm_pit_state2)
        require_size("pit: saved state", state.pit, size, "kvm_pit_state2")

    def restore(self, state: PitState) -> None:
        self.check(state)
        self.vm.set_pit2(uapi.kvm_pit_state2.from_buffer_copy(state.pit))


@dataclass
class ClockState:
    """kvmclock as KVM_GET_CLOCK reported it: `clock` in nanoseconds, KVM's `flags`
    (KVM_CLOCK_*), and `realtime`, the host's CLOCK_REALTIME at that instant (nanoseconds; 0
    unless flags has KVM_CLOCK_REALTIME)."""

    VERSION: ClassVar[int] = 1

    clock: int
    flags: int
    realtime: int


class ClockComponent:
    """Save and restore kvmclock, counting the wall-clock time that passed in between.

    KVM_GET_CLOCK's flags: KVM_CLOCK_TSC_STABLE, the value is the exact kvmclock every vCPU saw
    at that instant (KVM's master clock; without it, CLOCK_MONOTONIC plus an offset);
    KVM_CLOCK_REALTIME and KVM_CLOCK_HOST_TSC, `realtime` and `host_tsc` hold the host's
    CLOCK_REALTIME and TSC at that same instant (only when the host's clocksource is the TSC).
    KVM_SET_CLOCK uses only KVM_CLOCK_REALTIME: with it, KVM adds the host's real time elapsed
    since `realtime` to `clock` (never stepping backwards); it ignores the other flags.

    The choice: restore passes `realtime` back whenever KVM gave one, so a restored guest's
    clock has moved on by the time the VM spent saved, as it does for a VM paused in place
    (kvmclock runs while vCPUs are stopped), and the guest's wall time stays right. Without a
    realtime stamp the clock resumes at the saved value. host_tsc is not kept: KVM_SET_CLOCK
    does not take it, and the vCPUs' TSCs are restored with their MSRs.
    """

    state_type: ClassVar[type[ClockState]] = ClockState

    def __init__(self, vm: Vm) -> None:
        self.vm = vm

    def save(self) -> ClockState:
        data = self.vm.get_clock()
        realtime = data.realtime if data.flags & uapi.KVM_CLOCK_REALTIME else 0
        return ClockState(clock=data.clock, flags=data.flags, realtime=realtime)

    def check(self, state: ClockState) -> None:
        """StateError if a value does not fit kvm_clock_data's fields."""
        require_uint("clock: saved clock", state.clock, 64)
        require_uint("clock: saved flags", state.flags, 32)
        require_uint("clock: saved realtime", state.realtime, 64)

    def restore(self, state: ClockState) -> None:
        self.check(state)
        data = uapi.kvm_clock_data(clock=state.clock)
        if state.flags & uapi.KVM_CLOCK_REALTIME:
            data.flags = uapi.KVM_CLOCK_REALTIME
            data.realtime = state.realtime
        self.vm.set_clock(data)
