"""iommufd uAPI (include/uapi/linux/iommufd.h, Linux 7.3) and the selftest's IOMMU_TEST_CMD.

``/dev/iommu`` is the IOMMU interface that replaces VFIO's containers. One open of it is an
iommufd context; every ioctl takes a structure whose first u32 is its ``size`` (the kernel
accepts older, shorter structures, and rejects non-zero bytes it does not understand with
E2BIG). Objects live in the context, are named by u32 ids, and are freed by ``IOMMU_DESTROY``:

* **device** (dev_id): not created here but by binding a VFIO cdev to the iommufd
  (``VFIO_DEVICE_BIND_IOMMUFD``, see ``vfio.py``), which returns its ``out_devid``.
* **IOAS** (I/O address space): an IOVA -> user memory map, independent of hardware.
  ``IOMMU_IOAS_MAP`` maps process memory, ``IOMMU_IOAS_MAP_FILE`` a memfd (or a VFIO dma-buf),
  ``IOMMU_IOAS_COPY`` re-uses pinned pages of another IOAS; ``IOMMU_IOAS_IOVA_RANGES`` reports
  which IOVAs the attached devices allow. Attaching a device to an IOAS makes the kernel create
  (or share) a HWPT for it automatically.
* **HWPT** (hardware page table, an iommu_domain): ``IOMMU_HWPT_ALLOC`` makes one explicitly,
  either kernel-managed from an IOAS (optionally a nesting parent, or with dirty tracking, read
  with ``IOMMU_HWPT_GET_DIRTY_BITMAP`` for live migration) or user-managed (a guest's stage-1
  table, nested on a parent or a vIOMMU, invalidated with ``IOMMU_HWPT_INVALIDATE``).
* **FAULT** queue: an fd delivering I/O page faults of HWPTs (``iommu_hwpt_pgfault``) and taking
  responses (``iommu_hwpt_page_response``).
* **vIOMMU**: a VM's slice of a physical IOMMU (wraps a nesting-parent HWPT); **vDEVICE**: a
  device's identity (virtual id, e.g. vSID / vRID) under a vIOMMU; **vEVENTQ**: an fd of events
  for the guest (``iommufd_vevent_header`` + type-specific record); **HW queue**: a guest queue
  the hardware consumes directly.
* ``IOMMU_GET_HW_INFO`` describes a device's IOMMU (``iommu_hw_info_vtd`` ...) and capabilities.

The ``iommu_test_*`` structures and ``IOMMU_TEST_CMD`` come from the kernel's selftest header
``drivers/iommu/iommufd/iommufd_test.h`` (not uAPI; usable with CONFIG_IOMMUFD_TEST=y): its
MOCK_DOMAIN op creates a mock device bound to the iommufd and attached to an IOAS, without any
hardware.

Conventions are those of ``vfio.py``: C names for structs, fields and constants; flexible array
members omitted; ``_``-prefixed classes are C types without a tag; ``C_PREFIX`` maps each
``IntEnum``/``IntFlag`` class to its C prefix. tests/test_abi.py checks all of it against C.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64
from enum import IntEnum, IntFlag

from pyvmm.uapi.ioctl import _IO, register_names

# Headers this module mirrors (for the ABI probe), and which it covers completely. iommufd_test.h
# is put next to the uAPI headers by scripts/fetch-uapi-headers.
C_HEADERS = ("linux/iommufd.h", "iommufd_test.h")
C_COMPLETE_HEADERS = ("linux/iommufd.h", "iommufd_test.h")

IOMMUFD_TYPE = ord(";")


class IommufdCmd(IntEnum):
    """ioctl command numbers (the ``nr`` of each IOMMU_* request)."""

    BASE = 0x80
    DESTROY = 0x80
    IOAS_ALLOC = 0x81
    IOAS_ALLOW_IOVAS = 0x82
    IOAS_COPY = 0x83
    IOAS_IOVA_RANGES = 0x84
    IOAS_MAP = 0x85
    IOAS_UNMAP = 0x86
    OPTION = 0x87
    VFIO_IOAS = 0x88
    HWPT_ALLOC = 0x89
    GET_HW_INFO = 0x8A
    HWPT_SET_DIRTY_TRACKING = 0x8B
    HWPT_GET_DIRTY_BITMAP = 0x8C
    HWPT_INVALIDATE = 0x8D
    FAULT_QUEUE_ALLOC = 0x8E
    IOAS_MAP_FILE = 0x8F
    VIOMMU_ALLOC = 0x90
    VDEVICE_ALLOC = 0x91
    IOAS_CHANGE_PROCESS = 0x92
    VEVENTQ_ALLOC = 0x93
    HW_QUEUE_ALLOC = 0x94
    IOAS_NOIOMMU_GET_PA = 0x95


class iommu_destroy(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("id", c_uint32),
    ]


IOMMU_DESTROY = _IO(IOMMUFD_TYPE, IommufdCmd.DESTROY)


class iommu_ioas_alloc(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("out_ioas_id", c_uint32),
    ]


IOMMU_IOAS_ALLOC = _IO(IOMMUFD_TYPE, IommufdCmd.IOAS_ALLOC)


class iommu_iova_range(ctypes.Structure):
    _fields_ = [
        ("start", c_uint64),
        ("last", c_uint64),  # inclusive
    ]


class iommu_ioas_iova_ranges(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("ioas_id", c_uint32),
        ("num_iovas", c_uint32),  # in: entries at allowed_iovas; out: total (EMSGSIZE if more)
        ("__reserved", c_uint32),
        ("allowed_iovas", c_uint64),  # user pointer to iommu_iova_range[]
        ("out_iova_alignment", c_uint64),
    ]


IOMMU_IOAS_IOVA_RANGES = _IO(IOMMUFD_TYPE, IommufdCmd.IOAS_IOVA_RANGES)


class iommu_ioas_allow_iovas(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("ioas_id", c_uint32),
        ("num_iovas", c_uint32),
        ("__reserved", c_uint32),
        ("allowed_iovas", c_uint64),  # user pointer to iommu_iova_range[]
    ]


IOMMU_IOAS_ALLOW_IOVAS = _IO(IOMMUFD_TYPE, IommufdCmd.IOAS_ALLOW_IOVAS)


class IommuIoasMapFlag(IntFlag):
    """enum iommufd_ioas_map_flags (MAP, MAP_FILE, COPY)."""

    FIXED_IOVA = 1 << 0  # else the kernel picks the IOVA and returns it
    WRITEABLE = 1 << 1  # DMA may write
    READABLE = 1 << 2  # DMA may read


class iommu_ioas_map(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("ioas_id", c_uint32),
        ("__reserved", c_uint32),
        ("user_va", c_uint64),
        ("length", c_uint64),
        ("iova", c_uint64),
    ]


IOMMU_IOAS_MAP = _IO(IOMMUFD_TYPE, IommufdCmd.IOAS_MAP)


class iommu_ioas_noiommu_get_pa(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("ioas_id", c_uint32),
        ("__reserved", c_uint32),
        ("iova", c_uint64),
        ("length", c_uint64),  # in: max bytes; out: physically contiguous bytes
        ("out_phys", c_uint64),
    ]


IOMMU_IOAS_NOIOMMU_GET_PA = _IO(IOMMUFD_TYPE, IommufdCmd.IOAS_NOIOMMU_GET_PA)


class iommu_ioas_map_file(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("ioas_id", c_uint32),
        ("fd", c_int32),  # memfd, or a supported dma-buf
        ("start", c_uint64),  # byte offset in the file
        ("length", c_uint64),
        ("iova", c_uint64),
    ]


IOMMU_IOAS_MAP_FILE = _IO(IOMMUFD_TYPE, IommufdCmd.IOAS_MAP_FILE)


class iommu_ioas_copy(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("dst_ioas_id", c_uint32),
        ("src_ioas_id", c_uint32),
        ("length", c_uint64),
        ("dst_iova", c_uint64),
        ("src_iova", c_uint64),
    ]


IOMMU_IOAS_COPY = _IO(IOMMUFD_TYPE, IommufdCmd.IOAS_COPY)


class iommu_ioas_unmap(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("ioas_id", c_uint32),
        ("iova", c_uint64),
        ("length", c_uint64),  # in: bytes to unmap (0..U64_MAX: all); out: bytes unmapped
    ]


IOMMU_IOAS_UNMAP = _IO(IOMMUFD_TYPE, IommufdCmd.IOAS_UNMAP)


class IommuOption(IntEnum):
    """enum iommufd_option."""

    RLIMIT_MODE = 0  # global: 0 user-based, 1 process-based RLIMIT_MEMLOCK accounting
    HUGE_PAGES = 1  # per IOAS: 0 maps everything with PAGE_SIZE


class IommuOptionOp(IntEnum):
    """enum iommufd_option_ops."""

    SET = 0
    GET = 1


class iommu_option(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("option_id", c_uint32),
        ("op", c_uint16),
        ("__reserved", c_uint16),
        ("object_id", c_uint32),
        ("val64", c_uint64),
    ]


IOMMU_OPTION = _IO(IOMMUFD_TYPE, IommufdCmd.OPTION)


class IommuVfioIoasOp(IntEnum):
    """enum iommufd_vfio_ioas_op: the IOAS that VFIO container compatibility uses."""

    GET = 0
    SET = 1
    CLEAR = 2


class iommu_vfio_ioas(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("ioas_id", c_uint32),
        ("op", c_uint16),
        ("__reserved", c_uint16),
    ]


IOMMU_VFIO_IOAS = _IO(IOMMUFD_TYPE, IommufdCmd.VFIO_IOAS)


class IommuHwptAllocFlag(IntFlag):
    """enum iommufd_hwpt_alloc_flags."""

    ALLOC_NEST_PARENT = 1 << 0
    ALLOC_DIRTY_TRACKING = 1 << 1
    FAULT_ID_VALID = 1 << 2
    ALLOC_PASID = 1 << 3


class IommuHwptVtdS1Flag(IntFlag):
    """enum iommu_hwpt_vtd_s1_flags."""

    SRE = 1 << 0
    EAFE = 1 << 1
    WPE = 1 << 2


class iommu_hwpt_vtd_s1(ctypes.Structure):
    """IOMMU_HWPT_DATA_VTD_S1: an Intel VT-d stage-1 page table."""

    _fields_ = [
        ("flags", c_uint64),
        ("pgtbl_addr", c_uint64),
        ("addr_width", c_uint32),
        ("__reserved", c_uint32),
    ]


class iommu_hwpt_arm_smmuv3(ctypes.Structure):
    """IOMMU_HWPT_DATA_ARM_SMMUV3: the first two little-endian words of a nested STE."""

    _fields_ = [
        ("ste", c_uint64 * 2),
    ]


class iommu_hwpt_amd_guest(ctypes.Structure):
    """IOMMU_HWPT_DATA_AMD_GUEST: the guest Device Table Entry."""

    _fields_ = [
        ("dte", c_uint64 * 4),
    ]


class IommuHwptDataType(IntEnum):
    """enum iommu_hwpt_data_type (and the selftest's type)."""

    NONE = 0
    VTD_S1 = 1
    ARM_SMMUV3 = 2
    AMD_GUEST = 3
    SELFTEST = 0xDEAD  # iommufd_test.h: iommu_hwpt_selftest


class iommu_hwpt_alloc(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("dev_id", c_uint32),
        ("pt_id", c_uint32),  # IOAS, parent HWPT or vIOMMU
        ("out_hwpt_id", c_uint32),
        ("__reserved", c_uint32),
        ("data_type", c_uint32),
        ("data_len", c_uint32),
        ("data_uptr", c_uint64),
        ("fault_id", c_uint32),  # with IOMMU_HWPT_FAULT_ID_VALID
        ("__reserved2", c_uint32),
    ]


IOMMU_HWPT_ALLOC = _IO(IOMMUFD_TYPE, IommufdCmd.HWPT_ALLOC)


class IommuHwInfoVtdFlag(IntFlag):
    """enum iommu_hw_info_vtd_flags."""

    ERRATA_772415_SPR17 = 1 << 0  # no read-only mappings on a nesting parent


class iommu_hw_info_vtd(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("__reserved", c_uint32),
        ("cap_reg", c_uint64),
        ("ecap_reg", c_uint64),
    ]


class IommuHwInfoArmSmmuv3Flag(IntFlag):
    """enum iommu_hw_info_arm_smmuv3_flags."""

    ERRATA_REPEAT_TLBI_CFGI = 1 << 0


class iommu_hw_info_arm_smmuv3(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("__reserved", c_uint32),
        ("idr", c_uint32 * 6),
        ("iidr", c_uint32),
        ("aidr", c_uint32),
    ]


class iommu_hw_info_tegra241_cmdqv(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("version", c_uint8),
        ("log2vcmdqs", c_uint8),
        ("log2vsids", c_uint8),
        ("__reserved", c_uint8),
    ]


class iommu_hw_info_amd(ctypes.Structure):
    _fields_ = [
        ("efr", c_uint64),
        ("efr2", c_uint64),
    ]


class IommuHwInfoType(IntEnum):
    """enum iommu_hw_info_type (and the selftest's type)."""

    NONE = 0  # output: the driver reports no info
    DEFAULT = 0  # input: the default type
    INTEL_VTD = 1
    ARM_SMMUV3 = 2
    TEGRA241_CMDQV = 3
    AMD = 4
    SELFTEST = 0xFEEDBEEF  # iommufd_test.h: iommu_test_hw_info


class IommuHwCap(IntFlag):
    """enum iommufd_hw_capabilities (iommu_hw_info.out_capabilities)."""

    DIRTY_TRACKING = 1 << 0
    PCI_PASID_EXEC = 1 << 1
    PCI_PASID_PRIV = 1 << 2
    PCI_ATS_NOT_SUPPORTED = 1 << 3


class IommuHwInfoFlag(IntFlag):
    """enum iommufd_hw_info_flags."""

    INPUT_TYPE = 1 << 0  # in_data_type is an input


class _iommu_hw_info_data_type(ctypes.Union):
    _fields_ = [
        ("in_data_type", c_uint32),
        ("out_data_type", c_uint32),
    ]


class iommu_hw_info(ctypes.Structure):
    _anonymous_ = ("_data_type",)
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("dev_id", c_uint32),
        ("data_len", c_uint32),  # in: buffer length; out: length the kernel has
        ("data_uptr", c_uint64),
        ("_data_type", _iommu_hw_info_data_type),
        ("out_max_pasid_log2", c_uint8),
        ("__reserved", c_uint8 * 3),
        ("out_capabilities", c_uint64),
    ]


IOMMU_GET_HW_INFO = _IO(IOMMUFD_TYPE, IommufdCmd.GET_HW_INFO)


class IommuHwptDirtyTrackingFlag(IntFlag):
    """enum iommufd_hwpt_set_dirty_tracking_flags."""

    ENABLE = 1


class iommu_hwpt_set_dirty_tracking(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("hwpt_id", c_uint32),
        ("__reserved", c_uint32),
    ]


IOMMU_HWPT_SET_DIRTY_TRACKING = _IO(IOMMUFD_TYPE, IommufdCmd.HWPT_SET_DIRTY_TRACKING)


class IommuHwptGetDirtyBitmapFlag(IntFlag):
    """enum iommufd_hwpt_get_dirty_bitmap_flags."""

    NO_CLEAR = 1


class iommu_hwpt_get_dirty_bitmap(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("hwpt_id", c_uint32),
        ("flags", c_uint32),
        ("__reserved", c_uint32),
        ("iova", c_uint64),
        ("length", c_uint64),
        ("page_size", c_uint64),
        ("data", c_uint64),  # user pointer to the u64 bitmap, bit n = iova + n * page_size
    ]


IOMMU_HWPT_GET_DIRTY_BITMAP = _IO(IOMMUFD_TYPE, IommufdCmd.HWPT_GET_DIRTY_BITMAP)


class IommuHwptInvalidateDataType(IntEnum):
    """enum iommu_hwpt_invalidate_data_type (and the selftest's types)."""

    HWPT_INVALIDATE_DATA_VTD_S1 = 0
    VIOMMU_INVALIDATE_DATA_ARM_SMMUV3 = 1
    HWPT_INVALIDATE_DATA_SELFTEST = 0xDEADBEEF
    HWPT_INVALIDATE_DATA_SELFTEST_INVALID = 0xDADBEEF
    VIOMMU_INVALIDATE_DATA_SELFTEST = 0xDEADBEEF
    VIOMMU_INVALIDATE_DATA_SELFTEST_INVALID = 0xDADBEEF


class IommuVtdInvFlag(IntFlag):
    """enum iommu_hwpt_vtd_s1_invalidate_flags."""

    LEAF = 1 << 0


class iommu_hwpt_vtd_s1_invalidate(ctypes.Structure):
    _fields_ = [
        ("addr", c_uint64),  # 4 KiB aligned; 0 with npages U64_MAX: everything
        ("npages", c_uint64),
        ("flags", c_uint32),
        ("__reserved", c_uint32),
    ]


class iommu_viommu_arm_smmuv3_invalidate(ctypes.Structure):
    """A 128-bit little-endian SMMU CMDQ command."""

    _fields_ = [
        ("cmd", c_uint64 * 2),
    ]


class iommu_hwpt_invalidate(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("hwpt_id", c_uint32),  # nested HWPT or vIOMMU
        ("data_uptr", c_uint64),  # user pointer to entry_num entries of entry_len bytes
        ("data_type", c_uint32),
        ("entry_len", c_uint32),
        ("entry_num", c_uint32),  # in: requests; out: requests handled
        ("__reserved", c_uint32),
    ]


IOMMU_HWPT_INVALIDATE = _IO(IOMMUFD_TYPE, IommufdCmd.HWPT_INVALIDATE)


class IommuPgfaultFlag(IntFlag):
    """enum iommu_hwpt_pgfault_flags."""

    PASID_VALID = 1 << 0
    LAST_PAGE = 1 << 1  # last fault of a group: respond with its cookie


class IommuPgfaultPerm(IntFlag):
    """enum iommu_hwpt_pgfault_perm."""

    READ = 1 << 0
    WRITE = 1 << 1
    EXEC = 1 << 2
    PRIV = 1 << 3


class iommu_hwpt_pgfault(ctypes.Structure):
    """One fault read from a FAULT queue fd."""

    _fields_ = [
        ("flags", c_uint32),
        ("dev_id", c_uint32),
        ("pasid", c_uint32),
        ("grpid", c_uint32),
        ("perm", c_uint32),
        ("__reserved", c_uint32),
        ("addr", c_uint64),
        ("length", c_uint32),
        ("cookie", c_uint32),
    ]


class IommufdPageResponseCode(IntEnum):
    """enum iommufd_page_response_code."""

    SUCCESS = 0
    INVALID = 1


class iommu_hwpt_page_response(ctypes.Structure):
    """One response written to a FAULT queue fd."""

    _fields_ = [
        ("cookie", c_uint32),
        ("code", c_uint32),
    ]


class iommu_fault_alloc(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("out_fault_id", c_uint32),
        ("out_fault_fd", c_uint32),
    ]


IOMMU_FAULT_QUEUE_ALLOC = _IO(IOMMUFD_TYPE, IommufdCmd.FAULT_QUEUE_ALLOC)


class IommuViommuType(IntEnum):
    """enum iommu_viommu_type (and the selftest's type)."""

    DEFAULT = 0
    ARM_SMMUV3 = 1
    TEGRA241_CMDQV = 2
    SELFTEST = 0xDEADBEEF  # iommufd_test.h: iommu_viommu_selftest


class iommu_viommu_tegra241_cmdqv(ctypes.Structure):
    _fields_ = [
        ("out_vintf_mmap_offset", c_uint64),
        ("out_vintf_mmap_length", c_uint64),
    ]


class iommu_viommu_alloc(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("type", c_uint32),
        ("dev_id", c_uint32),
        ("hwpt_id", c_uint32),  # nesting parent HWPT
        ("out_viommu_id", c_uint32),
        ("data_len", c_uint32),
        ("__reserved", c_uint32),
        ("data_uptr", c_uint64),
    ]


IOMMU_VIOMMU_ALLOC = _IO(IOMMUFD_TYPE, IommufdCmd.VIOMMU_ALLOC)


class iommu_vdevice_alloc(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("viommu_id", c_uint32),
        ("dev_id", c_uint32),
        ("out_vdevice_id", c_uint32),
        ("virt_id", c_uint64),  # vSID (SMMUv3), vDeviceID (AMD), vRID (VT-d)
    ]


IOMMU_VDEVICE_ALLOC = _IO(IOMMUFD_TYPE, IommufdCmd.VDEVICE_ALLOC)


class iommu_ioas_change_process(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("__reserved", c_uint32),
    ]


IOMMU_IOAS_CHANGE_PROCESS = _IO(IOMMUFD_TYPE, IommufdCmd.IOAS_CHANGE_PROCESS)


class IommuVeventqFlag(IntFlag):
    """enum iommu_veventq_flag."""

    LOST_EVENTS = 1 << 0


class iommufd_vevent_header(ctypes.Structure):
    """Precedes each vEVENT read from a vEVENTQ fd (alone, with LOST_EVENTS, at the tail)."""

    _fields_ = [
        ("flags", c_uint32),
        ("sequence", c_uint32),  # 0..INT_MAX, wrapping; a gap means lost events
    ]


class IommuVeventqType(IntEnum):
    """enum iommu_veventq_type (and the selftest's type)."""

    DEFAULT = 0
    ARM_SMMUV3 = 1
    TEGRA241_CMDQV = 2
    SELFTEST = 0xBEEFBEEF  # iommufd_test.h: iommu_viommu_event_selftest


class iommu_vevent_arm_smmuv3(ctypes.Structure):
    _fields_ = [
        ("evt", c_uint64 * 4),  # 256-bit little-endian event record
    ]


class iommu_vevent_tegra241_cmdqv(ctypes.Structure):
    _fields_ = [
        ("lvcmdq_err_map", c_uint64 * 2),
    ]


class iommu_veventq_alloc(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("viommu_id", c_uint32),
        ("type", c_uint32),
        ("veventq_depth", c_uint32),
        ("out_veventq_id", c_uint32),
        ("out_veventq_fd", c_uint32),
        ("__reserved", c_uint32),
    ]


IOMMU_VEVENTQ_ALLOC = _IO(IOMMUFD_TYPE, IommufdCmd.VEVENTQ_ALLOC)


class IommuHwQueueType(IntEnum):
    """enum iommu_hw_queue_type (and the selftest's type)."""

    DEFAULT = 0
    TEGRA241_CMDQV = 1
    SELFTEST = 0xDEADBEEF


class iommu_hw_queue_alloc(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("viommu_id", c_uint32),
        ("type", c_uint32),
        ("index", c_uint32),
        ("out_hw_queue_id", c_uint32),
        ("nesting_parent_iova", c_uint64),
        ("length", c_uint64),
    ]


IOMMU_HW_QUEUE_ALLOC = _IO(IOMMUFD_TYPE, IommufdCmd.HW_QUEUE_ALLOC)


# -------- selftest (drivers/iommu/iommufd/iommufd_test.h, CONFIG_IOMMUFD_TEST) --------


class IommuTestOp(IntEnum):
    """iommu_test_cmd.op."""

    ADD_RESERVED = 1
    MOCK_DOMAIN = 2
    MD_CHECK_MAP = 3
    MD_CHECK_REFS = 4
    CREATE_ACCESS = 5
    DESTROY_ACCESS_PAGES = 6
    ACCESS_PAGES = 7
    ACCESS_RW = 8
    SET_TEMP_MEMORY_LIMIT = 9
    MOCK_DOMAIN_REPLACE = 10
    ACCESS_REPLACE_IOAS = 11
    MOCK_DOMAIN_FLAGS = 12
    DIRTY = 13
    MD_CHECK_IOTLB = 14
    TRIGGER_IOPF = 15
    DEV_CHECK_CACHE = 16
    TRIGGER_VEVENT = 17
    PASID_ATTACH = 18
    PASID_REPLACE = 19
    PASID_DETACH = 20
    PASID_CHECK_HWPT = 21
    DMABUF_GET = 22
    DMABUF_REVOKE = 23


MOCK_IOMMUPT_DEFAULT = 0
MOCK_IOMMUPT_HUGE = 1

# Mock domain geometry, for MOCK_IOMMUPT_DEFAULT.
MOCK_APERTURE_START = 1 << 24
MOCK_APERTURE_LAST = (1 << 31) - 1
MOCK_PAGE_SIZE = 2048
MOCK_HUGE_PAGE_SIZE = 512 * MOCK_PAGE_SIZE

# access_pages.flags (SYZ also in access_rw.flags)
MOCK_FLAGS_ACCESS_WRITE = 1 << 0
MOCK_FLAGS_ACCESS_SYZ = 1 << 16
# access_rw.flags
MOCK_ACCESS_RW_WRITE = 1 << 0
MOCK_ACCESS_RW_SLOW_PATH = 1 << 2
# create_access.flags
MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES = 1 << 0


class MockDeviceFlag(IntFlag):
    """mock_domain_flags.dev_flags."""

    NO_DIRTY = 1 << 0
    PASID = 1 << 2


MOCK_NESTED_DOMAIN_IOTLB_ID_MAX = 3
MOCK_NESTED_DOMAIN_IOTLB_NUM = 4
MOCK_DEV_CACHE_ID_MAX = 3
MOCK_DEV_CACHE_NUM = 4

IOMMU_TEST_PASID_RESERVED = 1024


class _iommu_test_cmd_add_reserved(ctypes.Structure):
    _fields_ = [
        ("start", c_uint64),
        ("length", c_uint64),
    ]


class _iommu_test_cmd_mock_domain(ctypes.Structure):
    _fields_ = [
        ("out_stdev_id", c_uint32),  # the selftest device object (destroy it to unplug)
        ("out_hwpt_id", c_uint32),
        ("out_idev_id", c_uint32),  # the iommufd device id, as from VFIO_DEVICE_BIND_IOMMUFD
    ]


class _iommu_test_cmd_mock_domain_flags(ctypes.Structure):
    _fields_ = [
        ("out_stdev_id", c_uint32),
        ("out_hwpt_id", c_uint32),
        ("out_idev_id", c_uint32),
        ("dev_flags", c_uint32),  # MockDeviceFlag
    ]


class _iommu_test_cmd_mock_domain_replace(ctypes.Structure):
    _fields_ = [
        ("pt_id", c_uint32),
    ]


class _iommu_test_cmd_check_map(ctypes.Structure):
    _fields_ = [
        ("iova", c_uint64),
        ("length", c_uint64),
        ("uptr", c_uint64),
    ]


class _iommu_test_cmd_check_refs(ctypes.Structure):
    _fields_ = [
        ("length", c_uint64),
        ("uptr", c_uint64),
        ("refs", c_uint32),
    ]


class _iommu_test_cmd_create_access(ctypes.Structure):
    _fields_ = [
        ("out_access_fd", c_uint32),
        ("flags", c_uint32),
    ]


class _iommu_test_cmd_destroy_access_pages(ctypes.Structure):
    _fields_ = [
        ("access_pages_id", c_uint32),
    ]


class _iommu_test_cmd_access_pages(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("out_access_pages_id", c_uint32),
        ("iova", c_uint64),
        ("length", c_uint64),
        ("uptr", c_uint64),
    ]


class _iommu_test_cmd_access_rw(ctypes.Structure):
    _fields_ = [
        ("iova", c_uint64),
        ("length", c_uint64),
        ("uptr", c_uint64),
        ("flags", c_uint32),
    ]


class _iommu_test_cmd_memory_limit(ctypes.Structure):
    _fields_ = [
        ("limit", c_uint32),
    ]


class _iommu_test_cmd_access_replace_ioas(ctypes.Structure):
    _fields_ = [
        ("ioas_id", c_uint32),
    ]


class _iommu_test_cmd_dirty(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("iova", c_uint64),
        ("length", c_uint64),
        ("page_size", c_uint64),
        ("uptr", c_uint64),
        ("out_nr_dirty", c_uint64),
    ]


class _iommu_test_cmd_check_iotlb(ctypes.Structure):
    _fields_ = [
        ("id", c_uint32),
        ("iotlb", c_uint32),
    ]


class _iommu_test_cmd_trigger_iopf(ctypes.Structure):
    _fields_ = [
        ("dev_id", c_uint32),
        ("pasid", c_uint32),
        ("grpid", c_uint32),
        ("perm", c_uint32),
        ("addr", c_uint64),
    ]


class _iommu_test_cmd_check_dev_cache(ctypes.Structure):
    _fields_ = [
        ("id", c_uint32),
        ("cache", c_uint32),
    ]


class _iommu_test_cmd_trigger_vevent(ctypes.Structure):
    _fields_ = [
        ("dev_id", c_uint32),
    ]


class _iommu_test_cmd_pasid_attach(ctypes.Structure):
    _fields_ = [
        ("pasid", c_uint32),
        ("pt_id", c_uint32),
    ]


class _iommu_test_cmd_pasid_replace(ctypes.Structure):
    _fields_ = [
        ("pasid", c_uint32),
        ("pt_id", c_uint32),
    ]


class _iommu_test_cmd_pasid_detach(ctypes.Structure):
    _fields_ = [
        ("pasid", c_uint32),
    ]


class _iommu_test_cmd_pasid_check(ctypes.Structure):
    _fields_ = [
        ("pasid", c_uint32),
        ("hwpt_id", c_uint32),
    ]


class _iommu_test_cmd_dmabuf_get(ctypes.Structure):
    _fields_ = [
        ("length", c_uint32),
        ("open_flags", c_uint32),
    ]


class _iommu_test_cmd_dmabuf_revoke(ctypes.Structure):
    _fields_ = [
        ("dmabuf_fd", c_int32),
        ("revoked", c_uint32),
    ]


class _iommu_test_cmd_u(ctypes.Union):
    _fields_ = [
        ("add_reserved", _iommu_test_cmd_add_reserved),
        ("mock_domain", _iommu_test_cmd_mock_domain),
        ("mock_domain_flags", _iommu_test_cmd_mock_domain_flags),
        ("mock_domain_replace", _iommu_test_cmd_mock_domain_replace),
        ("check_map", _iommu_test_cmd_check_map),
        ("check_refs", _iommu_test_cmd_check_refs),
        ("create_access", _iommu_test_cmd_create_access),
        ("destroy_access_pages", _iommu_test_cmd_destroy_access_pages),
        ("access_pages", _iommu_test_cmd_access_pages),
        ("access_rw", _iommu_test_cmd_access_rw),
        ("memory_limit", _iommu_test_cmd_memory_limit),
        ("access_replace_ioas", _iommu_test_cmd_access_replace_ioas),
        ("dirty", _iommu_test_cmd_dirty),
        ("check_iotlb", _iommu_test_cmd_check_iotlb),
        ("trigger_iopf", _iommu_test_cmd_trigger_iopf),
        ("check_dev_cache", _iommu_test_cmd_check_dev_cache),
        ("trigger_vevent", _iommu_test_cmd_trigger_vevent),
        ("pasid_attach", _iommu_test_cmd_pasid_attach),
        ("pasid_replace", _iommu_test_cmd_pasid_replace),
        ("pasid_detach", _iommu_test_cmd_pasid_detach),
        ("pasid_check", _iommu_test_cmd_pasid_check),
        ("dmabuf_get", _iommu_test_cmd_dmabuf_get),
        ("dmabuf_revoke", _iommu_test_cmd_dmabuf_revoke),
    ]


class iommu_test_cmd(ctypes.Structure):
    """The selftest multiplexer; ``id`` is the object the op acts on (MOCK_DOMAIN: the IOAS or
    HWPT to attach the new mock device to)."""

    _anonymous_ = ("_u",)
    _fields_ = [
        ("size", c_uint32),
        ("op", c_uint32),
        ("id", c_uint32),
        ("__reserved", c_uint32),
        ("_u", _iommu_test_cmd_u),
        ("last", c_uint32),
    ]


IOMMU_TEST_CMD = _IO(IOMMUFD_TYPE, IommufdCmd.BASE + 32)

MOCK_PASID_WIDTH = 20

IOMMU_HW_INFO_SELFTEST_REGVAL = 0xDEADBEEF


class iommu_test_hw_info(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("test_reg", c_uint32),  # IOMMU_HW_INFO_SELFTEST_REGVAL
    ]


IOMMU_TEST_IOTLB_DEFAULT = 0xBADBEEF
IOMMU_TEST_DEV_CACHE_DEFAULT = 0xBADDAD


class iommu_hwpt_selftest(ctypes.Structure):
    _fields_ = [
        ("iotlb", c_uint32),
        ("pagetable_type", c_uint32),  # MOCK_IOMMUPT_*
    ]


IOMMU_TEST_INVALIDATE_FLAG_ALL = 1 << 0


class iommu_hwpt_invalidate_selftest(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("iotlb_id", c_uint32),
    ]


class iommu_viommu_selftest(ctypes.Structure):
    _fields_ = [
        ("in_data", c_uint32),
        ("out_data", c_uint32),
        ("out_mmap_offset", c_uint64),
        ("out_mmap_length", c_uint64),
    ]


class iommu_viommu_invalidate_selftest(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("vdev_id", c_uint32),
        ("cache_id", c_uint32),
    ]


class iommu_viommu_event_selftest(ctypes.Structure):
    _fields_ = [
        ("virt_id", c_uint32),
    ]


IOMMU_TEST_HW_QUEUE_MAX = 2


C_PREFIX: dict[type, str | tuple[str, str]] = {
    IommufdCmd: "IOMMUFD_CMD_",
    IommuIoasMapFlag: "IOMMU_IOAS_MAP_",
    IommuOption: "IOMMU_OPTION_",
    IommuOptionOp: "IOMMU_OPTION_OP_",
    IommuVfioIoasOp: "IOMMU_VFIO_IOAS_",
    IommuHwptAllocFlag: "IOMMU_HWPT_",
    IommuHwptVtdS1Flag: "IOMMU_VTD_S1_",
    IommuHwptDataType: "IOMMU_HWPT_DATA_",
    IommuHwInfoVtdFlag: "IOMMU_HW_INFO_VTD_",
    IommuHwInfoArmSmmuv3Flag: "IOMMU_HW_INFO_ARM_SMMUV3_",
    IommuHwInfoType: "IOMMU_HW_INFO_TYPE_",
    IommuHwCap: "IOMMU_HW_CAP_",
    IommuHwInfoFlag: "IOMMU_HW_INFO_FLAG_",
    IommuHwptDirtyTrackingFlag: "IOMMU_HWPT_DIRTY_TRACKING_",
    IommuHwptGetDirtyBitmapFlag: "IOMMU_HWPT_GET_DIRTY_BITMAP_",
    IommuHwptInvalidateDataType: "IOMMU_",
    IommuVtdInvFlag: "IOMMU_VTD_INV_FLAGS_",
    IommuPgfaultFlag: "IOMMU_PGFAULT_FLAGS_",
    IommuPgfaultPerm: "IOMMU_PGFAULT_PERM_",
    IommufdPageResponseCode: "IOMMUFD_PAGE_RESP_",
    IommuViommuType: "IOMMU_VIOMMU_TYPE_",
    IommuVeventqFlag: "IOMMU_VEVENTQ_FLAG_",
    IommuVeventqType: "IOMMU_VEVENTQ_TYPE_",
    IommuHwQueueType: "IOMMU_HW_QUEUE_TYPE_",
    IommuTestOp: "IOMMU_TEST_OP_",
    MockDeviceFlag: "MOCK_FLAGS_DEVICE_",
}

register_names(globals(), "IOMMU_", IOMMUFD_TYPE)
