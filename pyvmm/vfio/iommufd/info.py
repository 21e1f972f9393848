"""What a device's IOMMU is and can do: IOMMU_GET_HW_INFO, decoded.

The kernel reports the IOMMU's type, generic capabilities (dirty tracking, PASID) and the
driver's own data: for Intel VT-d its capability and extended capability registers, for an
SMMUv3 its ID registers, for the selftest mock a test register. The driver data says what the
generic bits do not, chiefly whether the IOMMU can nest (a guest stage 1 over a host stage 2),
which is what `nesting_missing` answers with the checks the kernel's driver makes on those
registers. An IOMMU without a
`hw_info` op (virtio-iommu) reports type NONE and no data.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass, field
from enum import IntFlag

from pyvmm.uapi import iommufd as uapi
from pyvmm.vfio.errors import checked_ioctl
from pyvmm.vfio.iommufd.objects import BoundDevice, flag_names

#: The driver data structure of each IOMMU type, and the name pyvmm shows for the type.
DATA: dict[uapi.IommuHwInfoType, tuple[str, type[ctypes.Structure] | None]] = {
    uapi.IommuHwInfoType.NONE: ("none", None),
    uapi.IommuHwInfoType.INTEL_VTD: ("intel-vtd", uapi.iommu_hw_info_vtd),
    uapi.IommuHwInfoType.ARM_SMMUV3: ("arm-smmuv3", uapi.iommu_hw_info_arm_smmuv3),
    uapi.IommuHwInfoType.TEGRA241_CMDQV: ("tegra241-cmdqv", uapi.iommu_hw_info_tegra241_cmdqv),
    uapi.IommuHwInfoType.AMD: ("amd", uapi.iommu_hw_info_amd),
    uapi.IommuHwInfoType.SELFTEST: ("selftest", uapi.iommu_test_hw_info),
}

# Intel VT-d (spec 4.x, 11.4.2/11.4.3; the kernel's intel/iommu.h): single bits and fields.
VTD_CAP_BITS = {
    "AFL": 3, "RWBF": 4, "PLMR": 5, "PHMR": 6, "CM": 7, "ZLR": 22, "PSI": 39, "DWD": 54,
    "DRD": 55, "FL1GP": 56, "PI": 59, "FL5LP": 60,
}  # fmt: skip
VTD_ECAP_BITS = {
    "C": 0, "QI": 1, "DT": 2, "IR": 3, "EIM": 4, "PT": 6, "SC": 7, "NEST": 26, "PRS": 29,
    "ERS": 30, "SRS": 31, "NWFS": 33, "EAFS": 34, "PASID": 40, "DIT": 41, "PDS": 42,
    "SMTS": 43, "SLADS": 45, "SLTS": 46, "FLTS": 47, "SMPWC": 48, "RPS": 49,
}  # fmt: skip
# SMMUv3 IDR0 (Arm IHI 0070): stage 2 and stage 1 translation, ATS, PRI.
SMMU_IDR0_BITS = {"S2P": 0, "S1P": 1, "ATS": 10, "PRI": 16}


def _listed(names: list[str]) -> str:
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


def _bits(value: int, names: dict[str, int]) -> list[str]:
    return [name for name, bit in names.items() if value >> bit & 1]


@dataclass(frozen=True)
class HwInfo:
    """A device's IOMMU as IOMMU_GET_HW_INFO describes it."""

    device: str
    type: uapi.IommuHwInfoType
    capabilities: uapi.IommuHwCap
    max_pasid_log2: int
    data: ctypes.Structure | None = None
    #: what the driver data says, decoded: register values and the features they set
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def type_name(self) -> str:
        return DATA.get(self.type, (f"type {int(self.type):#x}", None))[0]

    @property
    def dirty_tracking(self) -> bool:
        return bool(self.capabilities & uapi.IommuHwCap.DIRTY_TRACKING)

    def nesting_missing(self) -> str | None:
        """None if this IOMMU can nest (a NEST_PARENT HWPT and a vIOMMU), else what it lacks,
        by the checks the kernel's driver makes."""
        if self.type == uapi.IommuHwInfoType.SELFTEST:
            return None
        if isinstance(self.data, uapi.iommu_hw_info_vtd):
            ecap = self.data.ecap_reg
            needed = ("SMTS", "SLTS", "NEST")  # scalable mode, a second stage, nesting
            lacking = [name for name in needed if not ecap >> VTD_ECAP_BITS[name] & 1]
            if lacking:
                return f"its ECAP register lacks {_listed(lacking)}"
            return None
        if isinstance(self.data, uapi.iommu_hw_info_arm_smmuv3):
            idr0 = self.data.idr[0]
            lacking = [name for name in ("S1P", "S2P") if not idr0 >> SMMU_IDR0_BITS[name] & 1]
            return f"its IDR0 lacks {_listed(lacking)}" if lacking else None
        if self.type == uapi.IommuHwInfoType.NONE:
            return "its driver reports no hardware information and offers no nesting"
        return "pyvmm does not know how this IOMMU nests"

    def dirty_tracking_missing(self) -> str | None:
        """None if DMA dirty tracking is there, else what is missing."""
        if self.dirty_tracking:
            return None
        if isinstance(self.data, uapi.iommu_hw_info_vtd):
            ecap = self.data.ecap_reg
            needed = ("SMTS", "SLTS", "SLADS", "SMPWC")
            lacking = [n for n in needed if not ecap >> VTD_ECAP_BITS[n] & 1]
            if lacking:
                return f"no IOMMU_HW_CAP_DIRTY_TRACKING: its ECAP lacks {_listed(lacking)}"
        return "no IOMMU_HW_CAP_DIRTY_TRACKING"

    def lines(self) -> list[str]:
        """For a person: one line per fact."""
        caps = flag_names(self.capabilities)
        found = [
            f"device          {self.device}",
            f"iommu           {self.type_name}",
            f"capabilities    {', '.join(caps) or 'none'}",
            f"max PASID bits  {self.max_pasid_log2}",
        ]
        found += [f"{name:<15} {value}" for name, value in self.fields.items()]
        nesting = self.nesting_missing()
        found.append(f"nesting         {'yes' if nesting is None else 'no: ' + nesting}")
        dirty = self.dirty_tracking_missing()
        found.append(f"dirty tracking  {'yes' if dirty is None else 'no: ' + dirty}")
        return found


def hw_info(device: BoundDevice) -> HwInfo:
    """IOMMU_GET_HW_INFO for a bound device (a VFIO cdev's binding, or a mock device)."""
    buffer = ctypes.create_string_buffer(256)  # larger than any driver's structure
    request = uapi.iommu_hw_info(
        size=ctypes.sizeof(uapi.iommu_hw_info),
        dev_id=device.id,
        data_len=len(buffer),
        data_uptr=ctypes.addressof(buffer),
    )
    failed = f"{device.name}: cannot read its IOMMU's hardware info"
    none = {errno.EOPNOTSUPP: "its IOMMU driver gives none"}
    checked_ioctl(device.iommufd.fd, uapi.IOMMU_GET_HW_INFO, request, failed, none)
    try:
        info_type = uapi.IommuHwInfoType(request.out_data_type)
    except ValueError:
        info_type = request.out_data_type  # a type newer than pyvmm: shown by number
    struct = DATA.get(info_type, ("", None))[1]
    data = None
    if struct is not None and request.data_len:  # a shorter (older) one reads as zeros past it
        data = struct.from_buffer_copy(buffer.raw[: ctypes.sizeof(struct)])
    return HwInfo(
        device=device.name,
        type=info_type,
        capabilities=uapi.IommuHwCap(request.out_capabilities),
        max_pasid_log2=request.out_max_pasid_log2,
        data=data,
        fields=decode_fields(data),
    )


def decode_fields(data: ctypes.Structure | None) -> dict[str, str]:
    """What a driver's hardware info structure says, as `HwInfo.fields` shows it."""
    if isinstance(data, uapi.iommu_hw_info_vtd):
        cap, ecap = data.cap_reg, data.ecap_reg
        return {
            "flags": _flag_text(data.flags, uapi.IommuHwInfoVtdFlag),
            "CAP": f"{cap:#018x}: {' '.join(_bits(cap, VTD_CAP_BITS))}",
            "  SAGAW/MGAW": f"{cap >> 8 & 0x1F:#x} / {(cap >> 16 & 0x3F) + 1} bits",
            "ECAP": f"{ecap:#018x}: {' '.join(_bits(ecap, VTD_ECAP_BITS))}",
            "  PASID bits": str((ecap >> 35 & 0x1F) + 1),
        }
    if isinstance(data, uapi.iommu_hw_info_arm_smmuv3):
        idr = list(data.idr)
        return {
            "flags": _flag_text(data.flags, uapi.IommuHwInfoArmSmmuv3Flag),
            "IDR0": f"{idr[0]:#010x}: {' '.join(_bits(idr[0], SMMU_IDR0_BITS))}",
            **{f"IDR{n}": f"{value:#010x}" for n, value in enumerate(idr) if n},
            "IIDR/AIDR": f"{data.iidr:#010x} / {data.aidr:#010x}",
        }
    if isinstance(data, uapi.iommu_hw_info_tegra241_cmdqv):
        return {
            "version": str(data.version),
            "VCMDQs/VSIDs": f"{1 << data.log2vcmdqs} / {1 << data.log2vsids}",
        }
    if isinstance(data, uapi.iommu_hw_info_amd):
        return {"EFR": f"{data.efr:#018x}", "EFR2": f"{data.efr2:#018x}"}
    if isinstance(data, uapi.iommu_test_hw_info):
        return {"test_reg": f"{data.test_reg:#x}", "flags": f"{data.flags:#x}"}
    return {}


def _flag_text(value: int, flags: type[IntFlag]) -> str:
    return ", ".join(flag_names(flags(value))) or "none"
