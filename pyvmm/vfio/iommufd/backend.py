"""The iommufd backend's IOMMU context for a VM (pyvmm.vfio.context): one iommufd, one IOAS
holding guest RAM at IOVA = GPA, and each assigned device's cdev bound to it, attached to the
IOAS, to an explicit HWPT over it (`--hwpt`) or to the stage 2 of hardware nesting
(`--viommu nested`); HWPTs made and replaced while the guest runs; DMA dirty tracking.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from pyvmm.vfio.context import HostDevice, VfioContext
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.iommufd.dirty import DmaDirtyLog
from pyvmm.vfio.iommufd.hwpt import Hwpt
from pyvmm.vfio.iommufd.nesting import Nesting, can_nest
from pyvmm.vfio.iommufd.objects import (
    BoundDevice,
    IoAddressSpace,
    Iommufd,
    IommufdObject,
    VfioBinding,
    open_cdev,
)
from pyvmm.vfio.iommufd.viommu import Vdevice

if TYPE_CHECKING:
    from pyvmm.kvm.vm import Vm
    from pyvmm.machine.address_space import AddressSpace


class IommufdContext(VfioContext):
    """The iommufd backend's IOMMU context: one iommufd and one IOAS holding guest RAM at
    IOVA = GPA; each device's cdev is bound to the iommufd and attached to the IOAS, then, if
    asked, moved to an explicit HWPT over it (`use_hwpt`) or to the stage 2 of hardware nesting
    (`nest`). While the guest runs, more HWPTs over the IOAS can be made and a device moved
    between them (`alloc_hwpt`, `attach`): each translates the same guest RAM."""

    backend = "iommufd"

    def __init__(self, vm: Vm | None = None, address_space: AddressSpace | None = None) -> None:
        super().__init__(vm, address_space)
        self.iommufd = self._stack.enter_context(Iommufd())  # destroys what is left
        try:
            self.ioas = self.iommufd.alloc_ioas()
        except BaseException:
            self._stack.close()
            raise
        self.bindings: dict[str, VfioBinding] = {}  # by BDF
        self.nesting: Nesting | None = None
        self.migrations.iommu_dirty = self._iommu_dirty  # (devices that log no DMA themselves)

    @property
    def dma(self) -> IoAddressSpace:
        return self.ioas

    @property
    def hwpt_ids(self) -> dict[str, int]:
        """The page table each device got, by BDF."""
        return {name: binding.hwpt_id for name, binding in self.bindings.items()}

    def _open(self, device: HostDevice, stack: contextlib.ExitStack) -> VfioDevice:
        if not device.cdev:
            raise VfioError(f"{device.name}: no VFIO cdev; is it bound to vfio-pci?")
        vfio_device = stack.enter_context(open_cdev(device.cdev, device.name))
        binding = VfioBinding(vfio_device, self.iommufd, emulated=device.mdev)
        stack.callback(binding.close)  # its vDEVICE destroyed, then detached, before its fd closes
        binding.attach(self.ioas)
        self.bindings[device.name] = binding
        stack.callback(self.bindings.pop, device.name, None)
        self._tell_kvm(vfio_device.fd, stack)
        return vfio_device

    def _binding(self, name: str, doing: str = "") -> VfioBinding:
        binding = self.bindings.get(name)
        if binding is None:
            known = ", ".join(self.bindings) or "none"
            raise VfioError(f"no device {name} is assigned through iommufd (assigned: {known})")
        if doing and binding.emulated:
            raise VfioError(
                f"mdev {name}: {doing} is for a device behind an IOMMU; an mdev's DMA is its "
                "parent driver's, through an iommufd access"
            )
        return binding

    def alloc_hwpt(
        self, name: str, *, nest_parent: bool = False, dirty_tracking: bool = False
    ) -> Hwpt:
        """A new paging HWPT over the guest-RAM IOAS, in the format of device `name`'s IOMMU."""
        binding = self._binding(name, "a HWPT")
        return Hwpt.paging(
            self.ioas, binding, nest_parent=nest_parent, dirty_tracking=dirty_tracking
        )

    def attach(self, name: str, object_id: int) -> int:
        """Move device `name` to the IOAS or a HWPT over it, by id, while DMA goes on (a
        replace); returns the HWPT id the kernel attached it to."""
        if name in self.migrations.iommu_logged:
            raise VfioError(
                f"{name}: its DMA writes are being tracked on a dirty-tracking HWPT (a migration "
                "or snapshot under way): move it once that has ended"
            )
        target = self.object(object_id)
        if target is not self.ioas and not (isinstance(target, Hwpt) and target.over is self.ioas):
            raise VfioError(
                f"iommufd {target.kind} {object_id} is not the machine's IOAS nor a paging HWPT "
                "over it: the guest's DMA would stop translating its RAM"
            )
        return self._binding(name, "a HWPT").attach(target)

    def use_hwpt(self, name: str) -> Hwpt:
        """Attach device `name` to an explicit HWPT over the IOAS (`--hwpt`): the context's
        first one if the device's IOMMU takes it, else a new one."""
        binding = self._binding(name, "--hwpt")
        for hwpt in self.iommufd.objects():
            if isinstance(hwpt, Hwpt) and hwpt.over is self.ioas and not hwpt.flags:
                with contextlib.suppress(VfioError):  # another IOMMU's format
                    binding.attach(hwpt)
                    return hwpt
        hwpt = self.alloc_hwpt(name)
        try:
            binding.attach(hwpt)
        except BaseException:
            hwpt.close()
            raise
        return hwpt

    def nest(self, name: str) -> Nesting:
        """Put device `name` on the stage 2 of hardware nesting (`--viommu nested`), made with
        the first such device; a VfioError naming the IOMMU if it cannot nest."""
        binding = self._binding(name, "--viommu nested")
        info = can_nest(binding)
        if self.nesting is None:
            self.nesting = Nesting(self.ioas, binding, info)
        self.nesting.add(binding, info)
        return self.nesting

    def dirty_log(self, names: list[str] | None = None) -> DmaDirtyLog:
        """DMA dirty tracking of guest RAM for the devices `names` (all those assigned now, by
        default) by their IOMMU's dirty bits (pyvmm.vfio.iommufd.dirty): a VfioError for an
        emulated device, which has no IOMMU page table; the log refuses to start where their
        IOMMU cannot track dirty pages."""

        def mapped() -> dict[int, int]:
            return dict(self._mapper.mapped) if self._mapper is not None else {}

        wanted = list(self.bindings) if names is None else names
        devices = [self._binding(name, "DMA dirty tracking") for name in wanted]
        return DmaDirtyLog(self.ioas, devices, mapped)

    def _iommu_dirty(self, names: list[str]) -> tuple[DmaDirtyLog, list[str]]:
        """The IOMMU's dirty log of those of `names` on an IOMMU page table (not mdevs)."""
        covered = [n for n in names if n in self.bindings and not self.bindings[n].emulated]
        if not covered:
            raise VfioError(
                f"{', '.join(names)}: no IOMMU page table to track DMA writes in (an mdev's "
                "DMA goes through its parent's driver)"
            )
        return self.dirty_log(covered), covered

    def object(self, object_id: int) -> IommufdObject:
        for item in self.iommufd.objects():
            if item.id == object_id:
                return item
        raise VfioError(f"the machine's iommufd has no object {object_id}")

    def destroy(self, object_id: int) -> None:
        """Destroy an object made over the machine's IOAS (not the IOAS, nor a device)."""
        target = self.object(object_id)
        if target is self.ioas or isinstance(target, BoundDevice):
            raise VfioError(
                f"iommufd {target.kind} {object_id} belongs to the machine: it goes with it"
            )
        nesting = self.nesting
        if nesting is not None and (
            target in (nesting.parent, nesting.viommu)
            or (isinstance(target, Vdevice) and target.viommu is nesting.viommu)
        ):
            raise VfioError(f"iommufd {target.kind} {object_id} is the machine's nesting")
        target.close()
