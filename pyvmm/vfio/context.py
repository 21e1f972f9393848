"""One IOMMU context per VM, shared by every device assigned to it.

A context is the VM's DMA space (the legacy backend's container, or an iommufd with one IOAS),
the device fds opened through it, and what the VM must know about them:

- guest RAM is DMA-mapped into it at IOVA = GPA by following the machine's address space (a
  `GuestRamMapper` listener, registered when the first device is in: the legacy container has
  no IOMMU model before a group joins it, and an IOAS knows its usable IOVA ranges only once a
  device is attached), so RAM that comes or goes later is mapped or unmapped with it;
- the KVM-VFIO pseudo device is told about every group fd (legacy) or device cdev fd
  (iommufd), which KVM needs for devices whose DMA must stay coherent with the guest's caches
  (KVM_DEV_VFIO_FILE_ADD; QEMU does the same).

`Machine.vfio()` makes the machine's context; a context without a VM or an address space (for
tools and tests that only want device fds) skips those two jobs. The backends are classes in
their own modules; backends.py names them.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from pyvmm.machine.host import DeviceHost
from pyvmm.vfio.dma_space import DmaSpace, GuestRamMapper
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.migration.group import MigratingDevices

if TYPE_CHECKING:
    from pyvmm.kvm.vm import Vm
    from pyvmm.machine.address_space import AddressSpace
    from pyvmm.vfio.device import VfioDevice
    from pyvmm.vfio.iommufd.objects import VfioBinding
    from pyvmm.vfio.sysfs import PciDevice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostDevice:
    """A host device as VFIO opens it: `name` is what its group knows it by (a PCI address,
    or an mdev's UUID), `iommu_group` its IOMMU group, `cdev` its VFIO cdev (vfioN) if any,
    `mdev` whether it is an mdev (emulated by its parent's driver: its DMA does not go through
    an IOMMU page table of its own)."""

    name: str
    iommu_group: str | None
    cdev: str | None
    mdev: bool = False


class VfioContext:
    """A VM's DMA space and the devices opened through it (a backend subclasses this)."""

    backend: ClassVar[str]

    def __init__(self, vm: Vm | None = None, address_space: AddressSpace | None = None) -> None:
        self._vm = vm
        self._address_space = address_space
        self._stack = ExitStack()  # the DMA space: closed last
        self._mapper: GuestRamMapper | None = None
        self.devices: dict[str, VfioDevice] = {}
        self._device_stacks: dict[str, ExitStack] = {}  # what closes each device
        # those of the devices that migrate, with the RAM mapped for their DMA
        self.migrations = MigratingDevices(
            lambda: dict(self._mapper.mapped) if self._mapper is not None else {}
        )

    @property
    def dma(self) -> DmaSpace:
        raise NotImplementedError

    def _open(self, device: HostDevice, stack: ExitStack) -> VfioDevice:
        """Open `device` in this context; what needs closing goes on `stack`."""
        raise NotImplementedError

    def open_pci(self, device: PciDevice) -> VfioDevice:
        """Open a vfio-pci device in this context (see `open`)."""
        return self.open(HostDevice(device.bdf, device.iommu_group, device.cdev))

    def open(self, device: HostDevice) -> VfioDevice:
        """Open a VFIO device in this context; the first one also maps guest RAM."""
        if device.name in self.devices:
            raise VfioError(f"{device.name} is already assigned to this machine")
        with ExitStack() as stack:
            vfio_device = self._open(device, stack)
            if self._mapper is None and self._address_space is not None:
                mapper = GuestRamMapper(self.dma)
                self._address_space.listen(mapper)  # maps all RAM, or nothing and raises
                self._mapper = mapper
            self._device_stacks[device.name] = stack.pop_all()
        self.devices[device.name] = vfio_device
        return vfio_device

    def release(self, name: str) -> None:
        """Close one device (its assignment failed half-way, say), so it can be opened again;
        with the last one goes the mapping of guest RAM."""
        stack = self._device_stacks.pop(name)
        del self.devices[name]
        self.migrations.forget(name)
        try:
            if not self.devices:
                self._unmap_ram()  # while a device still holds the IOMMU domain
        finally:
            stack.close()

    def _unmap_ram(self) -> None:
        if self._mapper is not None:
            assert self._address_space is not None
            mapper, self._mapper = self._mapper, None
            self._address_space.unlisten(mapper)

    def _tell_kvm(self, fd: int, stack: ExitStack) -> None:
        """Tell the VM's KVM-VFIO device about a VFIO file, and forget it with `stack`."""
        if self._vm is not None:
            self._vm.vfio_device.add(fd)
            stack.callback(self._vm.vfio_device.remove, fd)

    def close(self) -> None:
        """Unmap guest RAM, close the devices (the last opened first), release the DMA
        space, whatever fails on the way."""
        with ExitStack() as closing:
            closing.callback(self._stack.close)
            for name in list(self._device_stacks):
                closing.callback(self._device_stacks.pop(name).close)
            self.devices.clear()
            self.migrations.devices.clear()
            self._unmap_ram()

    def __enter__(self) -> VfioContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GuestIommuEndpoints(Protocol):
    """The machine's virtio-iommu as assignment sees it: where a device behind it registers."""

    def add_endpoint(self, binding: VfioBinding, devfn: int) -> None: ...


class VfioHost(DeviceHost, Protocol):
    """What assigning a device needs of the machine: a DeviceHost with its one IOMMU context
    (made by the first device assigned, in the backend asked for or the host's default), and
    its virtio-iommu (`--viommu virtio`, made by the first device behind it)."""

    @property
    def vfio_backend(self) -> str | None: ...

    def vfio(self, backend: str | None = None) -> VfioContext: ...

    def guest_iommu(self) -> GuestIommuEndpoints: ...
