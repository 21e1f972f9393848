"""A KVM virtual machine fd: memory slots, in-kernel irqchip and PIT, GSI routing, irqfd,
ioeventfd, dirty logging, vCPU creation, and its KVM-VFIO device."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyvmm.kvm.fd import FdOwner
from pyvmm.kvm.flexarray import flexible
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.uapi import kvm as uapi
from pyvmm.uapi.ioctl import ioctl

if TYPE_CHECKING:
    from pyvmm.kvm.irq import Route
    from pyvmm.kvm.system import System
    from pyvmm.kvm.vcpu import Vcpu


class Vm(FdOwner):
    """One VM. Created by `System.create_vm()`; close it to release the kernel object."""

    def __init__(self, system: System, fd: int) -> None:
        self.system = system
        self.fd = fd
        self._vfio_device: KvmVfioDevice | None = None

    def close(self) -> None:
        if self._vfio_device is not None:
            self._vfio_device.close()
            self._vfio_device = None
        super().close()

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (some answers differ per VM)."""
        return ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, int(cap))

    def enable_cap(self, cap: int, *args: int) -> None:
        req = uapi.kvm_enable_cap(cap=int(cap))
        for i, value in enumerate(args):
            req.args[i] = value
        ioctl(self.fd, uapi.KVM_ENABLE_CAP, req)

    # memory

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        """Install (or, with size 0, delete) a memory slot."""
        region = uapi.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=host_addr
        )
        ioctl(self.fd, uapi.KVM_SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        """KVM_GET_DIRTY_LOG for a slot of `size` bytes: a bitmap, one bit per page.

        Without manual-protect mode this also re-arms dirty tracking for the returned pages.
        """
        pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
        bitmap = (ctypes.c_uint64 * ((pages + 63) // 64))()
        log = uapi.kvm_dirty_log(slot=slot)
        log.dirty_bitmap = ctypes.addressof(bitmap)
        ioctl(self.fd, uapi.KVM_GET_DIRTY_LOG, log)
        return bytes(bitmap)

    # interrupt controllers and timers

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, uapi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, uapi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        """The in-kernel PICs, IOAPIC and local APICs."""
        ioctl(self.fd, uapi.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = uapi.KVM_PIT_SPEAKER_DUMMY) -> None:
        ioctl(self.fd, uapi.KVM_CREATE_PIT2, uapi.kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, uapi.KVM_IRQ_LINE, uapi.kvm_irq_level(irq=irq, level=level))

    def signal_msi(self, address: int, data: int) -> int:
        msi = uapi.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return ioctl(self.fd, uapi.KVM_SIGNAL_MSI, msi)

    def set_gsi_routing(self, routes: Sequence[Route]) -> None:
        table = flexible(uapi.kvm_irq_routing, uapi.kvm_irq_routing_entry, len(routes))()
        table.header.nr = len(routes)
        for entry, route in zip(table.entries, routes, strict=True):
            route.fill(entry)
        ioctl(self.fd, uapi.KVM_SET_GSI_ROUTING, table)

    def get_irqchip(self, chip_id: int) -> bytes:
        chip = uapi.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, uapi.KVM_GET_IRQCHIP, chip)
        return ctypes.string_at(ctypes.addressof(chip.chip), ctypes.sizeof(chip.chip))

    def set_irqchip(self, chip_id: int, state: bytes) -> None:
        chip = uapi.kvm_irqchip(chip_id=chip_id)
        if len(state) > ctypes.sizeof(chip.chip):
            raise ValueError(
                f"irqchip state of {len(state)} bytes; KVM holds {ctypes.sizeof(chip.chip)}"
            )
        ctypes.memmove(ctypes.addressof(chip.chip), state, len(state))
        ioctl(self.fd, uapi.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> uapi.kvm_pit_state2:
        state = uapi.kvm_pit_state2()
        ioctl(self.fd, uapi.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: uapi.kvm_pit_state2) -> None:
        ioctl(self.fd, uapi.KVM_SET_PIT2, state)

    def get_clock(self) -> uapi.kvm_clock_data:
        data = uapi.kvm_clock_data()
        ioctl(self.fd, uapi.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: uapi.kvm_clock_data) -> None:
        """KVM_SET_CLOCK: `data.clock`, advanced by the time since `data.realtime` when
        `data.flags` has KVM_CLOCK_REALTIME."""
        ioctl(self.fd, uapi.KVM_SET_CLOCK, data)

    # eventfds

    def irqfd(self, eventfd: int, gsi: int, resamplefd: int | None = None) -> None:
        """Signalling `eventfd` injects `gsi`. With `resamplefd` the GSI is level-triggered:
        KVM signals `resamplefd` on the guest's EOI so the source can re-assert (VFIO INTx)."""
        req = uapi.kvm_irqfd(fd=eventfd, gsi=gsi)
        if resamplefd is not None:
            req.flags = uapi.KVM_IRQFD_FLAG_RESAMPLE
            req.resamplefd = resamplefd
        ioctl(self.fd, uapi.KVM_IRQFD, req)

    def irqfd_remove(self, eventfd: int, gsi: int) -> None:
        req = uapi.kvm_irqfd(fd=eventfd, gsi=gsi, flags=uapi.KVM_IRQFD_FLAG_DEASSIGN)
        ioctl(self.fd, uapi.KVM_IRQFD, req)

    def _ioeventfd(
        self, eventfd: int, addr: int, length: int, pio: bool, datamatch: int | None, flags: int
    ) -> None:
        if pio:
            flags |= uapi.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= uapi.KVM_IOEVENTFD_FLAG_DATAMATCH
        req = uapi.kvm_ioeventfd(
            datamatch=datamatch or 0, addr=addr, len=length, fd=eventfd, flags=flags
        )
        ioctl(self.fd, uapi.KVM_IOEVENTFD, req)

    def ioeventfd(
        self,
        eventfd: int,
        addr: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
    ) -> None:
        """A guest write of `length` bytes at `addr` (port if `pio`) signals `eventfd` in the
        kernel, with no exit to userspace."""
        self._ioeventfd(eventfd, addr, length, pio, datamatch, 0)

    def ioeventfd_remove(
        self,
        eventfd: int,
        addr: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
    ) -> None:
        self._ioeventfd(eventfd, addr, length, pio, datamatch, uapi.KVM_IOEVENTFD_FLAG_DEASSIGN)

    # the KVM-VFIO pseudo device

    @property
    def vfio_device(self) -> KvmVfioDevice:
        """The VM's KVM-VFIO device, made the first time it is asked for (a VM without
        assigned devices has none); it goes with the VM."""
        if self._vfio_device is None:
            self._vfio_device = KvmVfioDevice(self)
        return self._vfio_device

    # vCPUs

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        from pyvmm.kvm.vcpu import Vcpu

        fd = ioctl(self.fd, uapi.KVM_CREATE_VCPU, vcpu_id)
        return Vcpu(self, vcpu_id, fd)


class KvmVfioDevice(FdOwner):
    """The KVM-VFIO pseudo device (KVM_DEV_TYPE_VFIO), through which KVM is told of the VFIO
    groups or device cdevs of its VM's assigned devices: KVM needs them for devices whose DMA
    must stay coherent with the guest's caches (non-coherent DMA), as QEMU tells it too."""

    def __init__(self, vm: Vm) -> None:
        device = uapi.kvm_create_device(type=uapi.KVM_DEV_TYPE_VFIO)
        ioctl(vm.fd, uapi.KVM_CREATE_DEVICE, device)
        self.fd = device.fd

    def add(self, fd: int) -> None:
        """Tell KVM about a VFIO group or device cdev fd (KVM_DEV_VFIO_FILE_ADD)."""
        self._file(uapi.KVM_DEV_VFIO_FILE_ADD, fd)

    def remove(self, fd: int) -> None:
        """KVM_DEV_VFIO_FILE_DEL: the file is no longer the VM's."""
        self._file(uapi.KVM_DEV_VFIO_FILE_DEL, fd)

    def _file(self, attr: int, fd: int) -> None:
        value = ctypes.c_int32(fd)
        request = uapi.kvm_device_attr(
            group=uapi.KVM_DEV_VFIO_FILE, attr=attr, addr=ctypes.addressof(value)
        )
        ioctl(self.fd, uapi.KVM_SET_DEVICE_ATTR, request)
