"""The KVM wrappers against the host's /dev/kvm: capabilities, vCPU state, kick, Ctrl-C."""

from __future__ import annotations

import ctypes
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from guestbuild import guest, requires_kvm

from pyvmm.board.machine import Machine, StopReason
from pyvmm.kvm.errors import KvmUnavailable
from pyvmm.kvm.system import System
from pyvmm.kvm.vcpu import KICK_SIGNAL, Vcpu
from pyvmm.machine.console import CaptureConsole
from pyvmm.uapi import kvm as uapi

pytestmark = [pytest.mark.kvm, requires_kvm]

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_STAR = 0xC0000081


def test_system_reports_what_pyvmm_needs() -> None:
    with System() as kvm:
        kvm.check_required()  # raises, naming what is missing
        assert kvm.vcpu_mmap_size() >= ctypes.sizeof(uapi.kvm_run)
        leaves = {e.function for e in kvm.supported_cpuid()}
        assert {0, 1, 0x80000000, 0x80000001} <= leaves
        assert MSR_STAR in kvm.msr_index_list()


def test_a_kvm_without_what_pyvmm_needs_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = System.check_extension
    lacking = {uapi.KvmCap.IRQFD_RESAMPLE, uapi.KvmCap.IOEVENTFD}
    monkeypatch.setattr(
        System, "check_extension", lambda self, cap: 0 if cap in lacking else real(self, cap)
    )
    with pytest.raises(KvmUnavailable) as err:
        Machine(mem_size=16 << 20)
    assert str(err.value) == "this KVM lacks IRQFD_RESAMPLE, IOEVENTFD, which pyvmm needs"


def test_a_new_vcpus_tsc_counts() -> None:
    """The check every machine makes at vCPU creation passes on a working KVM: the TSC MSR,
    read twice, has moved."""
    with Machine(mem_size=16 << 20) as machine:
        vcpu = machine.vcpus[0]
        first = vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
        assert vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC] > first


def test_a_kvm_that_froze_the_tsc_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lab's KVM with a stale TSC rate leaves a vCPU's TSC standing still (a Linux guest
    then hangs at its first idle): pyvmm says so before the guest runs, and what to do."""
    real = Vcpu.get_msrs

    def frozen(self: Vcpu, indices: list[int]) -> dict[int, int]:
        values = real(self, indices)
        if MSR_IA32_TSC in values:
            values[MSR_IA32_TSC] = 123456
        return values

    monkeypatch.setattr(Vcpu, "get_msrs", frozen)
    with pytest.raises(KvmUnavailable) as err:
        Machine(mem_size=16 << 20)
    message = str(err.value)
    assert message.startswith("this KVM froze vCPU 0's TSC (the host kernel's log says 'kvm: ")
    assert "tsc_early_khz=" in message and "\n" not in message


def test_cli_kvm_info() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pyvmm", "kvm", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert "KVM API version 12" in out
    assert "irqfd_resample" in out


def _fields(struct: ctypes.Structure) -> bytes:
    return ctypes.string_at(ctypes.addressof(struct), ctypes.sizeof(struct))


def test_vcpu_state_round_trips() -> None:
    """Every piece of vCPU state a snapshot needs can be read, written back, and read again
    unchanged; and a change written is a change read."""
    with Machine(mem_size=16 << 20) as machine:
        machine.load_elf(str(guest("hello")))
        vcpu = machine.vcpus[0]

        regs = vcpu.get_regs()
        regs.rbx = 0x1234_5678_9ABC_DEF0
        vcpu.set_regs(regs)
        assert vcpu.get_regs().rbx == 0x1234_5678_9ABC_DEF0

        sregs = vcpu.get_sregs()
        vcpu.set_sregs(sregs)
        assert _fields(vcpu.get_sregs()) == _fields(sregs)
        assert sregs.efer & 0x500 == 0x500  # long mode, as the boot set it

        fpu = vcpu.get_fpu()
        fpu.fcw = 0x27F
        vcpu.set_fpu(fpu)
        assert vcpu.get_fpu().fcw == 0x27F

        xsave = vcpu.get_xsave()
        assert len(xsave) == vcpu.xsave_size() >= 4096
        vcpu.set_xsave(xsave)
        assert vcpu.get_xsave() == xsave

        xcrs = vcpu.get_xcrs()
        vcpu.set_xcrs(xcrs)
        assert _fields(vcpu.get_xcrs()) == _fields(xcrs)

        vcpu.set_msrs({MSR_IA32_SYSENTER_CS: 0x10, MSR_STAR: 0x0023_0010_0000_0000})
        msrs = vcpu.get_msrs([MSR_IA32_SYSENTER_CS, MSR_STAR, MSR_IA32_TSC])
        assert msrs[MSR_IA32_SYSENTER_CS] == 0x10
        assert msrs[MSR_STAR] == 0x0023_0010_0000_0000
        assert MSR_IA32_TSC in msrs

        lapic = vcpu.get_lapic()
        assert len(lapic) == uapi.KVM_APIC_REG_SIZE
        vcpu.set_lapic(lapic)
        assert vcpu.get_lapic() == lapic

        events = vcpu.get_vcpu_events()
        assert not events.nmi.masked
        events.nmi.masked = 1
        vcpu.set_vcpu_events(events)
        assert _fields(vcpu.get_vcpu_events()) == _fields(events)

        assert vcpu.get_mp_state() == uapi.KvmMpState.RUNNABLE

        dregs = vcpu.get_debugregs()
        dregs.db[0] = 0x1000
        vcpu.set_debugregs(dregs)
        assert vcpu.get_debugregs().db[0] == 0x1000

        # the VM-wide state a snapshot needs
        for chip in (uapi.KVM_IRQCHIP_PIC_MASTER, uapi.KVM_IRQCHIP_IOAPIC):
            state = machine.vm.get_irqchip(chip)
            machine.vm.set_irqchip(chip, state)
            assert machine.vm.get_irqchip(chip) == state
        pit = machine.vm.get_pit2()
        speaker = pit.channels[2]
        assert (speaker.count, speaker.mode) == (0x10000, 0xFF)  # KVM's reset state
        speaker.count, speaker.mode, speaker.rw_mode = 1193, 3, 3  # a 1 kHz square wave
        machine.vm.set_pit2(pit)
        speaker = machine.vm.get_pit2().channels[2]
        assert (speaker.count, speaker.mode, speaker.rw_mode) == (1193, 3, 3)

        ns = 1_000_000_000
        machine.vm.set_clock(uapi.kvm_clock_data(clock=3600 * ns))
        assert 3600 * ns <= machine.vm.get_clock().clock < 3601 * ns


def test_ap_vcpus_wait_for_sipi() -> None:
    with Machine(mem_size=16 << 20, vcpus=2) as machine:
        assert machine.vcpus[1].get_mp_state() == uapi.KvmMpState.UNINITIALIZED


def test_stop_from_another_thread_kicks_halted_vcpus() -> None:
    """The interrupts guest waits in hlt (in the kernel) for an interrupt that never comes; the
    second vCPU waits for a SIPI. stop() must still end the run promptly."""
    with Machine(mem_size=16 << 20, vcpus=2, console=CaptureConsole()) as machine:
        machine.load_elf(str(guest("interrupts")))
        console = machine.console
        assert isinstance(console, CaptureConsole)
        stopper = threading.Thread(
            target=lambda: (console.wait_for("ready", 30), machine.stop(StopReason.STOPPED, 7))
        )
        stopper.start()
        start = time.monotonic()
        result = machine.run(timeout=60)
        stopper.join()
        assert result == result.__class__(StopReason.STOPPED, 7, "")
        assert time.monotonic() - start < 30


def test_ctrl_c_stops_the_guest_cleanly() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", str(guest("interrupts"))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "interrupts: ready\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "Traceback" not in err
    first, where = err.strip().splitlines()  # and where its vCPU was
    assert first == "pyvmm: stopped: interrupted"
    assert where.startswith("pyvmm:   vcpu0 ")


def blocked_signals(thread: threading.Thread) -> set[int]:
    """The thread's blocked signals, as the kernel reports them (SigBlk, a hex bit mask)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.MULTILINE)[1], 16)
    return {number for number in range(1, 65) if mask & (1 << (number - 1))}


def test_the_machines_threads_leave_ctrl_c_to_the_main_thread() -> None:
    """A SIGINT the kernel gave a vCPU or device thread would never wake the main thread in
    `wait()` (Python runs handlers there only): only the main thread may take it."""
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as machine:
        machine.load_elf(str(guest("interrupts")))
        machine.add_device("virtio-rng")
        machine.start()
        try:
            assert machine.pause()
            ours = [t for t in threading.enumerate() if t is not threading.main_thread()]
            names = {t.name for t in ours}
            assert {"vcpu0", "virtio-rng-worker"} <= names, names
            for thread in ours:
                blocked = blocked_signals(thread)
                assert {signal.SIGINT, signal.SIGTERM, signal.SIGHUP} <= blocked, thread.name
                assert KICK_SIGNAL not in blocked, thread.name
            assert signal.SIGINT not in blocked_signals(threading.main_thread())
            machine.resume()
        finally:
            machine.stop()
            machine.wait()


def test_a_machine_first_started_off_the_main_thread_says_why_it_cannot_start() -> None:
    """Only the main thread can install the kick signal's handler; without it a kick would end
    the process (the signal's default action), so start() refuses in one line instead."""
    script = f"""
import threading
from pyvmm.board.machine import Machine
from pyvmm.kvm.errors import KvmError

def off_main():
    with Machine(mem_size=16 << 20) as machine:
        machine.load_elf({str(guest("hello"))!r})
        try:
            machine.run(timeout=30)
        except KvmError as err:
            print("refused:", err)

thread = threading.Thread(target=off_main)
thread.start()
thread.join()
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused: pyvmm kicks vCPUs with a signal"), result.stdout
