"""A KVM virtual machine fd: memory slots, in-kernel irqchip and PIT, GSI routing, irqfd,
ioeventfd, dirty logging, the KVM VFIO pseudo-device, and vCPU creation."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyvmm.kvm.flexarray import flexible
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.uapi import kvm as uapi
from pyvmm.uapi.ioctl import ioctl

if TYPE_CHECKING:
    from pyvmm.kvm.irq import Route
    from pyvmm.kvm.system import System
    from pyvmm.kvm.vcpu import Vcpu


class Vm:
    """One VM. Created by `System.create_vm()`; close it to release the kernel object."""

    def __init__(self, system: System, fd: int) -> None:
        self.system = system
        self.fd = fd
        self._vfio_device_fd = -1

    def close(self) -> None:
        if self._vfio_device_fd >= 0:
            os.close(self._vfio_device_fd)
            self._vfio_device_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def vfio_file_add(self, fd: int) -> None:
        """Tell KVM about a VFIO group or device cdev fd (KVM_DEV_VFIO_FILE_ADD)."""
        self._vfio_file(uapi.KVM_DEV_VFIO_FILE_ADD, fd)

    def vfio_file_del(self, fd: int) -> None:
        self._vfio_file(uapi.KVM_DEV_VFIO_FILE_DEL, fd)

    def _vfio_file(self, attr: int, fd: int) -> None:
        if self._vfio_device_fd < 0:
            dev = uapi.kvm_create_device(type=uapi.KVM_DEV_TYPE_VFIO)
            ioctl(self.fd, uapi.KVM_CREATE_DEVICE, dev)
            self._vfio_device_fd = dev.fd
        value = ctypes.c_int32(fd)
        req = uapi.kvm_device_attr(
            group=uapi.KVM_DEV_VFIO_FILE, attr=attr, addr=ctypes.addressof(value)
        )
        ioctl(self._vfio_device_fd, uapi.KVM_SET_DEVICE_ATTR, req)

    # vCPUs

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        from pyvmm.kvm.vcpu import Vcpu

        fd = ioctl(self.fd, uapi.KVM_CREATE_VCPU, vcpu_id)
        return Vcpu(self, vcpu_id, fd)
