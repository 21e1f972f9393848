"""Hardware nesting for a VM's assigned devices (`--viommu nested`).

With nesting, the IOMMU translates a device's DMA twice: through the guest's own stage-1 table
(guest IOVA -> guest-physical), then through a stage 2 the host keeps (guest-physical -> host),
so a guest can drive its own IOMMU with no VMM in the DMA path. In iommufd the stage 2 is a
NEST_PARENT HWPT over the IOAS that maps guest RAM at IOVA = GPA; a vIOMMU (where the driver has
one: SMMUv3, the selftest mock; VT-d nests without one) wraps it and holds one
vDEVICE per device, naming it by its guest BDF. Until the guest programs a stage 1 (a nested
HWPT, once a guest-visible IOMMU exists), devices are attached to the parent itself, which
translates exactly as the plain IOAS did.

Whether the IOMMU can nest is read from IOMMU_GET_HW_INFO before anything is made, and a refusal
names the IOMMU and what it lacks (every emulated IOMMU of the lab lacks it).
"""

from __future__ import annotations

from pyvmm.uapi import iommufd as uapi
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.iommufd.hwpt import Hwpt
from pyvmm.vfio.iommufd.info import HwInfo, hw_info
from pyvmm.vfio.iommufd.objects import BoundDevice, IoAddressSpace
from pyvmm.vfio.iommufd.viommu import Vdevice, Viommu

#: The vIOMMU type of each IOMMU that has one; an IOMMU listed as None nests without one.
VIOMMU_TYPES: dict[uapi.IommuHwInfoType, uapi.IommuViommuType | None] = {
    uapi.IommuHwInfoType.INTEL_VTD: None,
    uapi.IommuHwInfoType.ARM_SMMUV3: uapi.IommuViommuType.ARM_SMMUV3,
    uapi.IommuHwInfoType.SELFTEST: uapi.IommuViommuType.SELFTEST,
}


def can_nest(device: BoundDevice) -> HwInfo:
    """The device's IOMMU info if it can nest; else a VfioError naming the IOMMU and what it
    lacks."""
    info = hw_info(device)
    missing = info.nesting_missing()
    if missing is None and info.type not in VIOMMU_TYPES:
        missing = "pyvmm does not know its vIOMMU type"
    if missing is not None:
        raise VfioError(
            f"{device.name}: --viommu nested: its IOMMU ({info.type_name}) cannot nest: "
            f"{missing}; use --viommu none, or an IOMMU with nesting"
        )
    return info


class Nesting:
    """The stage 2 shared by a VM's nesting devices (made with the first of them) and the
    vIOMMU over it, which holds each device's vDEVICE (destroyed with the device's binding)."""

    def __init__(self, ioas: IoAddressSpace, first: BoundDevice, info: HwInfo) -> None:
        """`info`: what `can_nest` said of the first device."""
        self.iommu_type = info.type
        self.parent = Hwpt.paging(ioas, first, nest_parent=True)
        viommu_type = VIOMMU_TYPES[info.type]
        try:
            self.viommu = (
                Viommu(self.parent, first, viommu_type) if viommu_type is not None else None
            )
        except BaseException:
            self.parent.close()
            raise

    def add(self, device: BoundDevice, info: HwInfo) -> None:
        """Put a device (the first one too) on the stage 2; `info` is what `can_nest` said."""
        if info.type != self.iommu_type:
            raise VfioError(
                f"{device.name}: --viommu nested: its IOMMU ({info.type_name}) is not the "
                "one the machine's other nesting devices are behind"
            )
        device.attach(self.parent)

    def identify(self, device: BoundDevice, virt_id: int) -> Vdevice | None:
        """Tell the vIOMMU the device's id as the guest sees it (its BDF); None where the IOMMU
        nests without a vIOMMU."""
        return self.viommu.vdevice(device, virt_id) if self.viommu is not None else None
