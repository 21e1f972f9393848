"""A KVM vCPU fd: KVM_RUN over the mmap'd `struct kvm_run`, register state, and a cross-thread kick.

KVM_RUN is entered, and its exit decoded, in C (pyvmm.kvm.exitloop): this is the hot path of every
PIO/MMIO access a Python device handles, and the C side leaves Python one small struct to read.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

from pyvmm.kvm.exitloop import ffi, lib
from pyvmm.kvm.flexarray import flexible
from pyvmm.kvm.mmap import Mapping
from pyvmm.uapi import kvm as uapi
from pyvmm.uapi.ioctl import IoctlError, ioctl, libc_ioctl

if TYPE_CHECKING:
    from pyvmm.kvm.vm import Vm

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGRTMIN + 1

_OFF_IMMEDIATE_EXIT = uapi.kvm_run.immediate_exit.offset


def kick_handler_installed() -> bool:
    return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None)


def install_kick_handler() -> bool:
    """Install a no-op handler for the kick signal so that it interrupts KVM_RUN.

    Python can only install handlers from the main thread; returns False when that was not
    possible and no handler is in place. Without one the signal is never sent (its default
    action would end the process), so a kick waits for the vCPU's next exit.
    """
    if kick_handler_installed():
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    return True


class Vcpu:
    """One vCPU. `run()` enters the guest until the next exit and returns the exit reason;
    `exit` then holds the access a PIO or MMIO exit asks for: `where` (port or address), `size`,
    `is_write`, `value` (a write's), `count` and `data_offset` (PIO items in `run_page`)."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._run_map = Mapping(vm.system.vcpu_mmap_size(), fd)
        self.run_page = self._run_map.view
        self.run_page_ptr = ffi.cast("void *", self._run_map.addr)
        self.exit = ffi.new("struct pyvmm_exit *")
        self.thread_id: int | None = None

    def close(self) -> None:
        self._run_map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # running

    def run(self) -> int:
        """KVM_RUN once. Returns the exit reason; a kick or signal gives KvmExit.INTR."""
        err = lib.pyvmm_vcpu_run(self.fd, self.run_page_ptr, self.exit)
        if err:
            raise IoctlError("KVM_RUN", -err)
        return self.exit.reason

    def complete_read(self, value: int) -> None:
        """Answer the last exit's read (a single port in, or an MMIO read) with `value`, whose
        low `exit.size` bytes the guest gets when it next enters KVM_RUN."""
        lib.pyvmm_complete_read(self.run_page_ptr, self.exit, value)

    def exit_struct(self) -> uapi.kvm_run:
        """A ctypes view of kvm_run, for the rare exits whose details are reported to users."""
        return uapi.kvm_run.from_address(self._run_map.addr)

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN soon, from any thread."""
        self.run_page[_OFF_IMMEDIATE_EXIT] = 1
        thread_id = self.thread_id  # once: the thread clears it as it ends
        if thread_id is not None and kick_handler_installed():
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(thread_id, KICK_SIGNAL)

    # memory

    def pre_fault_memory(self, gpa: int, size: int) -> None:
        """KVM_PRE_FAULT_MEMORY: map guest-physical [gpa, gpa + size) into KVM's stage-2 page
        tables now, as the vCPU's read faults would (faulting the pages into the VMM's mapping
        on the way). Blocks while the vCPU is in KVM_RUN. IoctlError: EOPNOTSUPP where the vCPU
        uses shadow paging, ENOENT for an address outside every memory slot."""
        request = uapi.kvm_pre_fault_memory(gpa=gpa, size=size)
        while request.size:  # KVM does a part at a time, and says what is left
            if libc_ioctl(self.fd, uapi.KVM_PRE_FAULT_MEMORY, ctypes.byref(request)) < 0:
                err = ctypes.get_errno()
                if err not in (errno.EINTR, errno.EAGAIN):
                    raise IoctlError("KVM_PRE_FAULT_MEMORY", err)

    # register state

    def _get(self, request: int, struct_type: type) -> ctypes.Structure:
        value = struct_type()
        ioctl(self.fd, request, value)
        return value

    def get_regs(self) -> uapi.kvm_regs:
        return self._get(uapi.KVM_GET_REGS, uapi.kvm_regs)

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        ioctl(self.fd, uapi.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        return self._get(uapi.KVM_GET_SREGS, uapi.kvm_sregs)

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        ioctl(self.fd, uapi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> uapi.kvm_fpu:
        return self._get(uapi.KVM_GET_FPU, uapi.kvm_fpu)

    def set_fpu(self, fpu: uapi.kvm_fpu) -> None:
        ioctl(self.fd, uapi.KVM_SET_FPU, fpu)

    def xsave_size(self) -> int:
        """Bytes in this kernel's XSAVE area: KVM_CAP_XSAVE2's answer, at least the legacy 4 KiB.

        KVM_SET_XSAVE reads that many bytes whatever its ioctl number says."""
        return max(self.vm.check_extension(uapi.KvmCap.XSAVE2), ctypes.sizeof(uapi.kvm_xsave))

    def get_xsave(self) -> bytes:
        """The XSAVE area, KVM_GET_XSAVE2-sized when the kernel says it is larger than 4 KiB."""
        size = self.xsave_size()
        buf = (ctypes.c_uint8 * size)()
        legacy = size == ctypes.sizeof(uapi.kvm_xsave)
        request = uapi.KVM_GET_XSAVE if legacy else uapi.KVM_GET_XSAVE2
        ioctl(self.fd, request, buf)
        return bytes(buf)

    def set_xsave(self, data: bytes) -> None:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        ioctl(self.fd, uapi.KVM_SET_XSAVE, buf)

    def get_xcrs(self) -> uapi.kvm_xcrs:
        return self._get(uapi.KVM_GET_XCRS, uapi.kvm_xcrs)

    def set_xcrs(self, xcrs: uapi.kvm_xcrs) -> None:
        ioctl(self.fd, uapi.KVM_SET_XCRS, xcrs)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read MSRs; those KVM does not return are left out."""
        buf = _msr_buffer(indices, [0] * len(indices))
        done = ioctl(self.fd, uapi.KVM_GET_MSRS, buf)
        words = _msr_words(buf, done)
        return dict(zip(words[0::2], words[1::2], strict=True))

    def set_msrs(self, values: dict[int, int]) -> None:
        buf = _msr_buffer(list(values), list(values.values()))
        done = ioctl(self.fd, uapi.KVM_SET_MSRS, buf)
        if done != len(values):
            bad = _msr_words(buf, done + 1)[-2]
            raise IoctlError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} was refused")

    def set_cpuid2(self, entries: list[uapi.kvm_cpuid_entry2]) -> None:
        buf = flexible(uapi.kvm_cpuid2, uapi.kvm_cpuid_entry2, len(entries))()
        buf.header.nent = len(entries)
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        ioctl(self.fd, uapi.KVM_SET_CPUID2, buf)

    def get_lapic(self) -> bytes:
        state = self._get(uapi.KVM_GET_LAPIC, uapi.kvm_lapic_state)
        return ctypes.string_at(ctypes.addressof(state), ctypes.sizeof(state))

    def set_lapic(self, data: bytes) -> None:
        state = uapi.kvm_lapic_state.from_buffer_copy(data)
        ioctl(self.fd, uapi.KVM_SET_LAPIC, state)

    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        return self._get(uapi.KVM_GET_VCPU_EVENTS, uapi.kvm_vcpu_events)

    def set_vcpu_events(self, events: uapi.kvm_vcpu_events) -> None:
        ioctl(self.fd, uapi.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> int:
        return self._get(uapi.KVM_GET_MP_STATE, uapi.kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, uapi.KVM_SET_MP_STATE, uapi.kvm_mp_state(mp_state=state))

    def get_tsc_khz(self) -> int:
        """The guest's TSC frequency in kHz (0 when KVM does not know it)."""
        return ioctl(self.fd, uapi.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """Run the guest's TSC at `khz` (needs KVM_CAP_TSC_CONTROL: hardware TSC scaling)."""
        ioctl(self.fd, uapi.KVM_SET_TSC_KHZ, khz)

    def get_debugregs(self) -> uapi.kvm_debugregs:
        return self._get(uapi.KVM_GET_DEBUGREGS, uapi.kvm_debugregs)

    def set_debugregs(self, regs: uapi.kvm_debugregs) -> None:
        ioctl(self.fd, uapi.KVM_SET_DEBUGREGS, regs)


def _msr_buffer(indices: list[int], values: list[int]) -> ctypes.Structure:
    """A kvm_msrs of these entries. Each kvm_msr_entry is two u64 words, (reserved 0 << 32 |
    index) and data, so the entries are filled as one array of words: far quicker than a
    ctypes field at a time, for the hundreds of MSRs a vCPU's state has."""
    buf = flexible(uapi.kvm_msrs, uapi.kvm_msr_entry, len(indices))()
    buf.header.nmsrs = len(indices)
    words = array.array("Q", bytes(16 * len(indices)))
    words[0::2] = array.array("Q", indices)
    words[1::2] = array.array("Q", values)
    ctypes.memmove(ctypes.addressof(buf.entries), words.buffer_info()[0], 16 * len(indices))
    return buf


def _msr_words(buf: ctypes.Structure, count: int) -> array.array[int]:
    """The first `count` entries of a kvm_msrs as words: index, data, index, data ..."""
    words = array.array("Q")
    words.frombytes(ctypes.string_at(ctypes.addressof(buf.entries), 16 * count))
    return words
