"""The KVM state of one x86 vCPU as a component: what a snapshot must carry, and the order in
which KVM has to be given it back.

What KVM keeps for a vCPU, and the ioctl that hands it out:

- general registers (KVM_GET_REGS) and special registers (KVM_GET_SREGS: segments, descriptor
  tables, control registers, EFER, the APIC base, an external interrupt accepted but not yet
  injected);
- the XSAVE area (x87, SSE, AVX and whatever else XCR0 enables; KVM_CAP_XSAVE2 gives its size)
  and the extended control registers (KVM_GET_XCRS);
- the model-specific registers that KVM_GET_MSR_INDEX_LIST names and KVM_GET_MSRS returns for
  this vCPU: SYSENTER/SYSCALL targets, TSC and TSC_ADJUST, the TSC deadline, PAT, and the
  kvmclock MSRs when KVM lists them;
- the local APIC's register page, timer included (KVM_GET_LAPIC);
- events: a pending or injected exception, interrupt or NMI, NMI masking, the interrupt shadow,
  SMM (KVM_GET_VCPU_EVENTS);
- the multiprocessor state: runnable, halted, waiting for INIT or SIPI (KVM_GET_MP_STATE);
- the debug registers DR0-DR3, DR6, DR7 (KVM_GET_DEBUGREGS);
- the TSC frequency the guest was given (KVM_GET_TSC_KHZ).

Kernel structs are kept as their raw bytes: they are facts of the ABI, and KVM checks what is in
them on the way back in. Their lengths are checked here, before any ioctl. CPUID is not part of
the state: the machine sets it from its configuration when it builds the vCPU (and KVM refuses
to change it once the vCPU has run), so a state goes into a vCPU built the same way.

Saving (as Firecracker's KvmVcpu::save_state, src/vmm/src/arch/x86_64/vcpu.rs): the MP state
first, because KVM_GET_MP_STATE delivers a pending INIT or SIPI (kvm_apic_accept_events), which
changes registers and the LAPIC; the events last, so that they reflect whatever the other reads
did.

Restoring follows KVM's dependencies (Firecracker's KvmVcpu::restore_state, same file, and
QEMU's kvm_arch_put_registers in target/i386/kvm/kvm.c agree on them):

1. the TSC frequency, if it must be scaled: the TSC MSR is written in guest cycles;
2. general registers: KVM_SET_REGS drops a pending exception, which the events bring back;
3. special registers: they hold the APIC base (whether the LAPIC is enabled, xAPIC or x2APIC,
   which decides how KVM reads the LAPIC page), and for a BSP at the reset vector KVM_SET_SREGS
   makes the vCPU runnable, so they go before the LAPIC and the MP state;
4. the XSAVE area and the XCRs (each checked against CPUID, not against each other), the debug
   registers;
5. the LAPIC: after the APIC base, and before the MSRs because KVM ignores a TSC-deadline write
   unless the LAPIC timer is in TSC-deadline mode;
6. the MSRs, with IA32_TSC_DEADLINE written after all the others: KVM arms the deadline timer
   against the guest's TSC, which must already be the restored one (Firecracker defers it the
   same way; QEMU writes it after everything else);
7. the MP state: after the special registers (see 3), before the events because KVM refuses
   INIT_RECEIVED and SIPI_RECEIVED while INIT is blocked, as in SMM, which the events restore;
8. the events, last: the exception, interrupt and NMI state that KVM_SET_REGS and KVM_SET_SREGS
   touched, SMM, and the LAPIC's latched INIT.

Both directions need the vCPU out of KVM_RUN (the machine paused): the events and the LAPIC are
only consistent then.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from pyvmm.kvm.errors import KvmError
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.machine.state import StateError, require_size, require_uint
from pyvmm.uapi import kvm as uapi

log = logging.getLogger(__name__)

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0

# KVM_GET_MSRS and KVM_SET_MSRS refuse 256 entries or more in one call (MAX_IO_MSRS, E2BIG).
MSRS_PER_CALL = 255

# Two calibrations of the same TSC differ by some parts per million. Like Firecracker and QEMU,
# treat frequencies within 250 ppm as the same, and scale the guest's TSC only beyond that.
TSC_KHZ_TOLERANCE_PPM = 250

_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "regs": uapi.kvm_regs,
    "sregs": uapi.kvm_sregs,
    "xcrs": uapi.kvm_xcrs,
    "lapic": uapi.kvm_lapic_state,
    "vcpu_events": uapi.kvm_vcpu_events,
    "debugregs": uapi.kvm_debugregs,
}


@dataclass
class VcpuState:
    """One x86 vCPU as KVM holds it; byte fields are the kernel structs named beside them."""

    VERSION: ClassVar[int] = 1

    regs: bytes  # struct kvm_regs
    sregs: bytes  # struct kvm_sregs
    xsave: bytes  # struct kvm_xsave, KVM_CAP_XSAVE2 bytes long
    xcrs: bytes  # struct kvm_xcrs
    msrs: dict[int, int]  # MSR index: value
    lapic: bytes  # struct kvm_lapic_state
    vcpu_events: bytes  # struct kvm_vcpu_events
    mp_state: int  # KVM_MP_STATE_*
    debugregs: bytes  # struct kvm_debugregs
    tsc_khz: int  # 0: KVM did not know the TSC's frequency


@dataclass(frozen=True)
class MsrProbe:
    """Which of the MSRs KVM lists this vCPU's KVM_GET_MSRS returns, in KVM's order."""

    readable: tuple[int, ...]
    unreadable: tuple[int, ...]

    @functools.cached_property
    def readable_set(self) -> frozenset[int]:
        return frozenset(self.readable)


def probe_msrs(vcpu: Vcpu, indices: Sequence[int]) -> MsrProbe:
    """Sort `indices` into those KVM_GET_MSRS reads on `vcpu` and those it refuses.

    KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it did, so after a
    refusal the probe goes on from the next MSR: one call per 255 MSRs, plus one per refusal.
    """
    readable: list[int] = []
    unreadable: list[int] = []
    rest = list(dict.fromkeys(indices))
    while rest:
        chunk = rest[:MSRS_PER_CALL]
        done = len(vcpu.get_msrs(chunk))
        readable += chunk[:done]
        if done < len(chunk):
            unreadable.append(chunk[done])
            done += 1
        rest = rest[done:]
    return MsrProbe(tuple(readable), tuple(unreadable))


class VcpuComponent:
    """Save and restore one vCPU's KVM state (see the module docstring for the order)."""

    state_type: ClassVar[type[VcpuState]] = VcpuState

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self._name = f"vcpu{vcpu.id}"
        self._xsave_size = vcpu.xsave_size()

    @functools.cached_property
    def msr_probe(self) -> MsrProbe:
        """The MSRs this vCPU saves: probed once, on first use (after the machine has set
        CPUID, which decides what KVM lets userspace read), then kept."""
        listed = self.vcpu.vm.system.msr_index_list()
        if MSR_IA32_TSC not in listed:
            listed.append(MSR_IA32_TSC)
        probe = probe_msrs(self.vcpu, listed)
        if probe.unreadable:
            log.info(
                "%s: KVM lists MSRs it does not read on this vCPU, not saved: %s",
                self._name,
                ", ".join(f"{index:#x}" for index in probe.unreadable),
            )
        return probe

    def save(self) -> VcpuState:
        vcpu = self.vcpu
        mp_state = vcpu.get_mp_state()
        regs = bytes(vcpu.get_regs())
        sregs = bytes(vcpu.get_sregs())
        xsave = vcpu.get_xsave()
        xcrs = bytes(vcpu.get_xcrs())
        debugregs = bytes(vcpu.get_debugregs())
        lapic = vcpu.get_lapic()
        msrs = self._read_msrs()
        tsc_khz = self._tsc_khz
        events = bytes(vcpu.get_vcpu_events())
        return VcpuState(
            regs=regs,
            sregs=sregs,
            xsave=xsave,
            xcrs=xcrs,
            msrs=msrs,
            lapic=lapic,
            vcpu_events=events,
            mp_state=mp_state,
            debugregs=debugregs,
            tsc_khz=tsc_khz,
        )

    def _read_msrs(self) -> dict[int, int]:
        indices = self.msr_probe.readable
        values: dict[int, int] = {}
        for start in range(0, len(indices), MSRS_PER_CALL):
            chunk = list(indices[start : start + MSRS_PER_CALL])
            got = self.vcpu.get_msrs(chunk)
            if len(got) < len(chunk):
                raise KvmError(
                    f"{self._name}: KVM_GET_MSRS stopped at MSR {chunk[len(got)]:#x}, "
                    "which it read when probed"
                )
            values.update(got)
        return values

    def prepare_restore(self) -> None:
        """Probe the MSRs and read the TSC frequency now, not during the first restore."""
        _ = self.msr_probe, self._tsc_khz

    def check(self, state: VcpuState) -> None:
        """StateError if `state` cannot go into this vCPU; reads from KVM, writes nothing."""
        name = self._name
        for field, struct in _STRUCTS.items():
            blob = getattr(state, field)
            require_size(f"{name}: saved {field}", blob, ctypes.sizeof(struct), struct.__name__)
        require_size(f"{name}: saved xsave", state.xsave, self._xsave_size, "XSAVE area")
        require_uint(f"{name}: saved mp_state", state.mp_state, 32)
        require_uint(f"{name}: saved tsc_khz", state.tsc_khz, 32)
        if not all(0 <= i < 1 << 32 and 0 <= v < 1 << 64 for i, v in state.msrs.items()):
            for index, value in state.msrs.items():  # (the first that does not fit, named)
                require_uint(f"{name}: saved MSR index", index, 32)
                require_uint(f"{name}: saved MSR {index:#x}", value, 64)
        foreign = sorted(state.msrs.keys() - self.msr_probe.readable_set)
        if foreign:
            raise StateError(
                f"{name}: saved MSRs {', '.join(f'{i:#x}' for i in foreign)} are not ones this "
                "kernel reads on this vCPU (saved on another kernel or CPU model?)"
            )
        if self._tsc_differs(state.tsc_khz) and not self.vcpu.vm.check_extension(
            uapi.KvmCap.TSC_CONTROL
        ):
            raise StateError(
                f"{name}: the saved guest TSC runs at {state.tsc_khz} kHz, this one at "
                f"{self._tsc_khz} kHz, and KVM here cannot scale it "
                "(no KVM_CAP_TSC_CONTROL)"
            )

    @functools.cached_property
    def _tsc_khz(self) -> int:
        """This vCPU's TSC frequency: read once, since only `restore` changes it."""
        return self.vcpu.get_tsc_khz()

    def _tsc_differs(self, saved_khz: int) -> bool:
        here = self._tsc_khz
        if not saved_khz or not here:
            return False
        return abs(here - saved_khz) * 1_000_000 > saved_khz * TSC_KHZ_TOLERANCE_PPM

    def restore(self, state: VcpuState) -> None:
        self.check(state)
        vcpu = self.vcpu
        if self._tsc_differs(state.tsc_khz):
            vcpu.set_tsc_khz(state.tsc_khz)
            self._tsc_khz = state.tsc_khz
        vcpu.set_regs(uapi.kvm_regs.from_buffer_copy(state.regs))
        vcpu.set_sregs(uapi.kvm_sregs.from_buffer_copy(state.sregs))
        vcpu.set_xsave(state.xsave)
        vcpu.set_xcrs(uapi.kvm_xcrs.from_buffer_copy(state.xcrs))
        vcpu.set_debugregs(uapi.kvm_debugregs.from_buffer_copy(state.debugregs))
        vcpu.set_lapic(state.lapic)
        msrs = dict(state.msrs)
        deadline = msrs.pop(MSR_IA32_TSC_DEADLINE, None)
        items = list(msrs.items())
        for start in range(0, len(items), MSRS_PER_CALL):
            vcpu.set_msrs(dict(items[start : start + MSRS_PER_CALL]))
        if deadline is not None:
            vcpu.set_msrs({MSR_IA32_TSC_DEADLINE: deadline})
        vcpu.set_mp_state(state.mp_state)
        vcpu.set_vcpu_events(uapi.kvm_vcpu_events.from_buffer_copy(state.vcpu_events))
