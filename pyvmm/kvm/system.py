"""The KVM system object: /dev/kvm, its capabilities, supported CPUID and MSR lists."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvmm.kvm.errors import KvmUnavailable
from pyvmm.kvm.fd import FdOwner
from pyvmm.kvm.flexarray import flexible
from pyvmm.uapi import kvm as uapi
from pyvmm.uapi.ioctl import IoctlError, ioctl

if TYPE_CHECKING:
    from pyvmm.kvm.vm import Vm

KVM_DEVICE = "/dev/kvm"

# What a pyvmm machine cannot do without: the in-kernel irqchip and PIT, interrupts and doorbells
# that never pass through Python (irqfd with resample, ioeventfd, GSI routing), kicking a vCPU
# out of KVM_RUN (immediate_exit), and the KVM-VFIO device (device control).
REQUIRED_CAPABILITIES = (
    uapi.KvmCap.IRQCHIP,
    uapi.KvmCap.PIT2,
    uapi.KvmCap.IRQFD,
    uapi.KvmCap.IRQFD_RESAMPLE,
    uapi.KvmCap.IOEVENTFD,
    uapi.KvmCap.IRQ_ROUTING,
    uapi.KvmCap.IMMEDIATE_EXIT,
    uapi.KvmCap.DEVICE_CTRL,
)


# /dev/kvm's answers about the host (capabilities, supported CPUID, MSR lists) do not change
# while a process runs: each is asked once per path. A machine asks for a dozen of them, and a
# restore's budget is a few milliseconds.
_HOST_ANSWERS: dict[tuple[str, str, int], Any] = {}


class System(FdOwner):
    """An open /dev/kvm. Close it (or use it as a context manager) when done."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: load the kvm module or run on a host with KVM"
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                f"no permission to open {path}: run as root or join the 'kvm' group"
            ) from None
        version = ioctl(self.fd, uapi.KVM_GET_API_VERSION)
        if version != uapi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"KVM API version {version}, expected {uapi.KVM_API_VERSION}")

    def _asked_once(self, question: str, argument: int, ask: Callable[[], Any]) -> Any:
        key = (self.path, question, argument)
        if key not in _HOST_ANSWERS:
            _HOST_ANSWERS[key] = ask()
        return _HOST_ANSWERS[key]

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when unsupported, else a capability-specific value."""
        return self._asked_once(
            "extension", int(cap), lambda: ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, int(cap))
        )

    def check_required(self) -> None:
        """KvmUnavailable naming what this KVM lacks of REQUIRED_CAPABILITIES."""
        missing = [cap.name for cap in REQUIRED_CAPABILITIES if not self.check_extension(cap)]
        if missing:
            raise KvmUnavailable(f"this KVM lacks {', '.join(missing)}, which pyvmm needs")

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, uapi.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID (fresh entries: callers edit them)."""
        entries = self._asked_once("cpuid", 0, self._ask_supported_cpuid)
        return [uapi.kvm_cpuid_entry2.from_buffer_copy(entry) for entry in entries]

    def _ask_supported_cpuid(self) -> list[bytes]:
        """The raw entries, growing the buffer until the kernel's list fits."""
        count = 64
        while True:
            buf = flexible(uapi.kvm_cpuid2, uapi.kvm_cpuid_entry2, count)()
            buf.header.nent = count
            try:
                ioctl(self.fd, uapi.KVM_GET_SUPPORTED_CPUID, buf)
            except IoctlError as err:
                if err.errno == errno.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise
            return [bytes(buf.entries[i]) for i in range(buf.header.nent)]

    def _msr_list(self, request: int) -> list[int]:
        return list(self._asked_once("msrs", request, lambda: self._ask_msr_list(request)))

    def _ask_msr_list(self, request: int) -> list[int]:
        probe = uapi.kvm_msr_list(nmsrs=0)
        try:
            ioctl(self.fd, request, probe)
        except IoctlError as err:
            if err.errno != errno.E2BIG:
                raise
        buf = flexible(uapi.kvm_msr_list, ctypes.c_uint32, probe.nmsrs)()
        buf.header.nmsrs = probe.nmsrs
        ioctl(self.fd, request, buf)
        return list(buf.entries[: buf.header.nmsrs])

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs a VMM should save and restore."""
        return self._msr_list(uapi.KVM_GET_MSR_INDEX_LIST)

    def feature_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: MSRs that describe CPU features."""
        return self._msr_list(uapi.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def create_vm(self) -> Vm:
        from pyvmm.kvm.vm import Vm

        return Vm(self, ioctl(self.fd, uapi.KVM_CREATE_VM, 0))
