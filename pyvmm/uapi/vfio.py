"""VFIO uAPI (include/uapi/linux/vfio.h, Linux 7.3): ctypes structures, constants, ioctl numbers.

VFIO gives a user-space driver (here: the VMM) safe access to a physical device: its MMIO/PIO
regions, its interrupts, and DMA isolated by the IOMMU. The kernel objects are reached through
file descriptors:

* **container** (``/dev/vfio/vfio``, the legacy IOMMU interface): holds one IOMMU context. Groups
  are added to it, then ``VFIO_SET_IOMMU`` selects the IOMMU model (type1v2 on x86), after which
  ``VFIO_IOMMU_MAP_DMA``/``UNMAP_DMA`` program IOVA -> process-memory mappings for every device
  in the container. ``VFIO_IOMMU_GET_INFO`` reports page sizes and a capability chain (usable
  IOVA ranges, dirty-tracking limits, DMA mapping quota).
* **group** (``/dev/vfio/$GROUP``): the IOMMU group, the unit of isolation. It must be *viable*
  (every device in it bound to a VFIO driver) and attached to a container before
  ``VFIO_GROUP_GET_DEVICE_FD`` hands out device fds.
* **device fd**: from a group, or opened directly as a character device
  (``/dev/vfio/devices/vfioN``, "cdev"). A cdev is bound to an iommufd
  (``VFIO_DEVICE_BIND_IOMMUFD``) and attached to an iommufd IOAS or HWPT
  (``VFIO_DEVICE_ATTACH_IOMMUFD_PT``) instead of using a container; see ``iommufd.py``.
  On a device fd: ``VFIO_DEVICE_GET_INFO``, ``VFIO_DEVICE_GET_REGION_INFO`` (each region is a
  window of the device fd at ``offset``: ``pread``/``pwrite``/``mmap`` it), ``GET_IRQ_INFO`` /
  ``SET_IRQS`` (eventfds for INTx/MSI/MSI-X), resets, and ``VFIO_DEVICE_FEATURE``, which
  multiplexes features such as migration: the device's migration state machine
  (``enum vfio_device_mig_state``) moves under ``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE``, and the
  state itself is read/written through a separate data fd it returns.

INFO structures are extensible: the caller sets ``argsz`` to the buffer size; if a capability
chain is present (``*_FLAG_CAPS``), ``cap_offset`` is the offset of the first
``vfio_info_cap_header`` from the start of the buffer, and each header's ``next`` the next one.
If the buffer was too small the kernel raises ``argsz`` to the size needed.

Conventions of pyvmm's uAPI modules: struct classes and fields carry the C names; flexible array
members (``data[]``) are omitted (they do not count in ``sizeof``), except as zero-length arrays
where they raise the struct's alignment (three capability structs here); classes whose names
start with ``_`` are C types without a tag (anonymous unions, used through ``_anonymous_``).
Families of constants are ``IntEnum``/``IntFlag`` classes; ``C_PREFIX`` maps each to the C name
prefix (or ``(prefix, suffix)``) so ``VfioRegionInfoFlag.READ`` is ``VFIO_REGION_INFO_FLAG_READ``.
Other constants and all ioctl numbers are module-level ints with the kernel's names.
tests/test_abi.py checks all of it against the C header.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64
from enum import IntEnum, IntFlag

from pyvmm.uapi.ioctl import _IO, register_names

# Headers this module mirrors (for the ABI probe), and which it covers completely.
C_HEADERS = ("linux/vfio.h",)
C_COMPLETE_HEADERS = ("linux/vfio.h",)

VFIO_API_VERSION = 0

VFIO_TYPE = ord(";")
VFIO_BASE = 100


class VfioExtension(IntEnum):
    """Arguments of VFIO_CHECK_EXTENSION; the IOMMU models are also VFIO_SET_IOMMU's argument."""

    TYPE1_IOMMU = 1
    SPAPR_TCE_IOMMU = 2
    TYPE1v2_IOMMU = 3
    # IOMMU enforces DMA cache coherence (e.g. PCIe No-Snoop stripping).
    DMA_CC_IOMMU = 4
    EEH = 5
    # 6 is __VFIO_RESERVED_TYPE1_NESTING_IOMMU.
    SPAPR_TCE_v2_IOMMU = 7
    # No translation, no isolation; taints the kernel.
    NOIOMMU_IOMMU = 8
    # Supports VFIO_DMA_UNMAP_FLAG_ALL.
    UNMAP_ALL = 9
    # Supports VFIO_DMA_MAP_FLAG_VADDR / VFIO_DMA_UNMAP_FLAG_VADDR.
    UPDATE_VADDR = 10


class vfio_info_cap_header(ctypes.Structure):
    """Header of one capability in an INFO ioctl's chain; offsets are from the buffer start."""

    _fields_ = [
        ("id", c_uint16),
        ("version", c_uint16),
        ("next", c_uint32),
    ]


# -------- ioctls on the container (/dev/vfio/vfio) --------

VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
# Argument: the extension number, by value.
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
# Argument: the IOMMU model (VfioExtension.TYPE1v2_IOMMU ...), by value.
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)

# -------- ioctls on a group (/dev/vfio/$GROUP) --------


class vfio_group_status(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
    ]


class VfioGroupFlag(IntFlag):
    VIABLE = 1 << 0
    CONTAINER_SET = 1 << 1


VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
# Argument: pointer to an int holding the container fd.
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
# Argument: pointer to a NUL-terminated device name (e.g. b"0000:00:03.0"); returns the fd.
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)

# -------- ioctls on a device fd --------


class vfio_device_info(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("num_regions", c_uint32),  # max region index + 1
        ("num_irqs", c_uint32),  # max IRQ index + 1
        ("cap_offset", c_uint32),
        ("pad", c_uint32),
    ]


class VfioDeviceFlag(IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1
    PLATFORM = 1 << 2
    AMBA = 1 << 3
    CCW = 1 << 4
    AP = 1 << 5
    FSL_MC = 1 << 6
    CAPS = 1 << 7
    CDX = 1 << 8


VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)

# Values of a mediated device type's device_api sysfs attribute.
VFIO_DEVICE_API_PCI_STRING = "vfio-pci"
VFIO_DEVICE_API_PLATFORM_STRING = "vfio-platform"
VFIO_DEVICE_API_AMBA_STRING = "vfio-amba"
VFIO_DEVICE_API_CCW_STRING = "vfio-ccw"
VFIO_DEVICE_API_AP_STRING = "vfio-ap"


class VfioDeviceInfoCap(IntEnum):
    """Capability ids in VFIO_DEVICE_GET_INFO's chain (ZPCI ones: see linux/vfio_zdev.h)."""

    ZPCI_BASE = 1
    ZPCI_GROUP = 2
    ZPCI_UTIL = 3
    ZPCI_PFIP = 4
    PCI_ATOMIC_COMP = 5


class vfio_device_info_cap_pci_atomic_comp(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("flags", c_uint32),
        ("reserved", c_uint32),
    ]


class VfioPciAtomicComp(IntFlag):
    COMP32 = 1 << 0
    COMP64 = 1 << 1
    COMP128 = 1 << 2


class vfio_region_info(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("index", c_uint32),
        ("cap_offset", c_uint32),
        ("size", c_uint64),
        ("offset", c_uint64),  # of the region within the device fd
    ]


class VfioRegionInfoFlag(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)


class VfioRegionInfoCap(IntEnum):
    """Capability ids in VFIO_DEVICE_GET_REGION_INFO's chain."""

    # Only the listed areas of the region may be mmap()ed (e.g. not the MSI-X table).
    SPARSE_MMAP = 1
    # Device-specific region: vfio_region_info_cap_type.
    TYPE = 2
    # The MSI-X table/PBA of this BAR may be mmap()ed (no payload).
    MSIX_MAPPABLE = 3
    NVLINK2_SSATGT = 4  # deprecated
    NVLINK2_LNKSPD = 5  # deprecated


class vfio_region_sparse_mmap_area(ctypes.Structure):
    _fields_ = [
        ("offset", c_uint64),  # within the region
        ("size", c_uint64),
    ]


class vfio_region_info_cap_sparse_mmap(ctypes.Structure):
    """Followed by ``nr_areas`` vfio_region_sparse_mmap_area entries (``areas[]``)."""

    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_areas", c_uint32),
        ("reserved", c_uint32),
        # Flexible array kept (zero length) because it gives the struct C's 8-byte alignment.
        ("areas", vfio_region_sparse_mmap_area * 0),
    ]


class vfio_region_info_cap_type(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("type", c_uint32),  # global per bus driver
        ("subtype", c_uint32),  # type specific
    ]


# Region types (vfio_region_info_cap_type.type). A PCI vendor type is VENDOR_TYPE | vendor id.
VFIO_REGION_TYPE_PCI_VENDOR_TYPE = 1 << 31
VFIO_REGION_TYPE_PCI_VENDOR_MASK = 0xFFFF


class VfioRegionType(IntEnum):
    GFX = 1
    CCW = 2
    MIGRATION_DEPRECATED = 3


# Region subtypes; their meaning depends on the type (and for PCI vendor types, the vendor).
# 8086 (Intel) vendor:
VFIO_REGION_SUBTYPE_INTEL_IGD_OPREGION = 1
VFIO_REGION_SUBTYPE_INTEL_IGD_HOST_CFG = 2
VFIO_REGION_SUBTYPE_INTEL_IGD_LPC_CFG = 3
# 10de (NVIDIA) vendor, deprecated:
VFIO_REGION_SUBTYPE_NVIDIA_NVLINK2_RAM = 1
# 1014 (IBM) vendor, deprecated:
VFIO_REGION_SUBTYPE_IBM_NVLINK2_ATSD = 1
# VFIO_REGION_TYPE_GFX:
VFIO_REGION_SUBTYPE_GFX_EDID = 1
# VFIO_REGION_TYPE_CCW:
VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD = 1
VFIO_REGION_SUBTYPE_CCW_SCHIB = 2
VFIO_REGION_SUBTYPE_CCW_CRW = 3
# VFIO_REGION_TYPE_MIGRATION_DEPRECATED:
VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED = 1


class vfio_region_gfx_edid(ctypes.Structure):
    """Layout of the VFIO_REGION_SUBTYPE_GFX_EDID region."""

    _fields_ = [
        ("edid_offset", c_uint32),
        ("edid_max_size", c_uint32),
        ("edid_size", c_uint32),
        ("max_xres", c_uint32),
        ("max_yres", c_uint32),
        ("link_state", c_uint32),
    ]


VFIO_DEVICE_GFX_LINK_STATE_UP = 1
VFIO_DEVICE_GFX_LINK_STATE_DOWN = 2


class vfio_device_migration_info(ctypes.Structure):
    """The removed v1 migration region's layout (kept in the header; use the v2 FEATURE API)."""

    _fields_ = [
        ("device_state", c_uint32),
        ("reserved", c_uint32),
        ("pending_bytes", c_uint64),
        ("data_offset", c_uint64),
        ("data_size", c_uint64),
    ]


VFIO_DEVICE_STATE_V1_STOP = 0
VFIO_DEVICE_STATE_V1_RUNNING = 1 << 0
VFIO_DEVICE_STATE_V1_SAVING = 1 << 1
VFIO_DEVICE_STATE_V1_RESUMING = 1 << 2
VFIO_DEVICE_STATE_MASK = (
    VFIO_DEVICE_STATE_V1_RUNNING | VFIO_DEVICE_STATE_V1_SAVING | VFIO_DEVICE_STATE_V1_RESUMING
)


class vfio_region_info_cap_nvlink2_ssatgt(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("tgt", c_uint64),
    ]


class vfio_region_info_cap_nvlink2_lnkspd(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("link_speed", c_uint32),
        ("__pad", c_uint32),
    ]


class vfio_irq_info(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("index", c_uint32),
        ("count", c_uint32),  # number of IRQs (vectors) in this index
    ]


class VfioIrqInfoFlag(IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2  # level-triggered: unmask after each interrupt
    NORESIZE = 1 << 3  # vectors can't be added without disabling the whole index


VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)


class vfio_irq_set(ctypes.Structure):
    """Followed by ``data[]``: ``count`` u8 bools (DATA_BOOL) or s32 eventfds (DATA_EVENTFD)."""

    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("index", c_uint32),
        ("start", c_uint32),
        ("count", c_uint32),
    ]


class VfioIrqSetFlag(IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5
    DATA_TYPE_MASK = DATA_NONE | DATA_BOOL | DATA_EVENTFD
    ACTION_TYPE_MASK = ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER


VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)


class VfioPciRegion(IntEnum):
    """vfio-pci's fixed region indexes; indexes >= VFIO_PCI_NUM_REGIONS are device specific."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    # Legacy VGA: I/O ports 0x3b0-0x3bb, 0x3c0-0x3df and MMIO 0xa0000-0xbffff at their own offsets.
    VGA = 8


VFIO_PCI_NUM_REGIONS = 9


class VfioPciIrq(IntEnum):
    """vfio-pci's IRQ indexes."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


VFIO_PCI_NUM_IRQS = 5

VFIO_CCW_CONFIG_REGION_INDEX = 0
VFIO_CCW_NUM_REGIONS = 1


class VfioCcwIrq(IntEnum):
    IO = 0
    CRW = 1
    REQ = 2


VFIO_CCW_NUM_IRQS = 3


class VfioApIrq(IntEnum):
    REQ = 0
    CFG_CHG = 1


VFIO_AP_NUM_IRQS = 2


class _vfio_pci_dependent_device_id(ctypes.Union):
    _fields_ = [
        ("group_id", c_uint32),  # legacy group/container users
        ("devid", c_uint32),  # cdev users (VFIO_PCI_HOT_RESET_FLAG_DEV_ID)
    ]


class vfio_pci_dependent_device(ctypes.Structure):
    _anonymous_ = ("_id",)
    _fields_ = [
        ("_id", _vfio_pci_dependent_device_id),
        ("segment", c_uint16),
        ("bus", c_uint8),
        ("devfn", c_uint8),
    ]


# devid values other than a real device id.
VFIO_PCI_DEVID_OWNED = 0
VFIO_PCI_DEVID_NOT_OWNED = -1


class vfio_pci_hot_reset_info(ctypes.Structure):
    """Followed by ``count`` vfio_pci_dependent_device entries (``devices[]``)."""

    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("count", c_uint32),
    ]


class VfioPciHotResetFlag(IntFlag):
    DEV_ID = 1 << 0  # devid (not group_id) is reported: the device is a cdev
    DEV_ID_OWNED = 1 << 1  # all affected devices are owned: reset with an empty fd array


VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)


class vfio_pci_hot_reset(ctypes.Structure):
    """Followed by ``count`` s32 group fds (``group_fds[]``); cdev users pass count 0."""

    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("count", c_uint32),
    ]


VFIO_DEVICE_PCI_HOT_RESET = _IO(VFIO_TYPE, VFIO_BASE + 13)


class _vfio_device_gfx_plane_info_id(ctypes.Union):
    _fields_ = [
        ("region_index", c_uint32),
        ("dmabuf_id", c_uint32),
    ]


class vfio_device_gfx_plane_info(ctypes.Structure):
    _anonymous_ = ("_id",)
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("drm_plane_type", c_uint32),
        ("drm_format", c_uint32),
        ("drm_format_mod", c_uint64),
        ("width", c_uint32),
        ("height", c_uint32),
        ("stride", c_uint32),
        ("size", c_uint32),
        ("x_pos", c_uint32),
        ("y_pos", c_uint32),
        ("x_hot", c_uint32),
        ("y_hot", c_uint32),
        ("_id", _vfio_device_gfx_plane_info_id),
        ("reserved", c_uint32),
    ]


class VfioGfxPlaneType(IntFlag):
    PROBE = 1 << 0
    DMABUF = 1 << 1
    REGION = 1 << 2


VFIO_DEVICE_QUERY_GFX_PLANE = _IO(VFIO_TYPE, VFIO_BASE + 14)
VFIO_DEVICE_GET_GFX_DMABUF = _IO(VFIO_TYPE, VFIO_BASE + 15)


class vfio_device_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("offset", c_uint64),  # device fd offset of the write
        ("data", c_uint64),
        ("fd", c_int32),  # -1 to de-assign
        ("reserved", c_uint32),
    ]


# vfio_device_ioeventfd.flags: the write's width.
VFIO_DEVICE_IOEVENTFD_8 = 1 << 0
VFIO_DEVICE_IOEVENTFD_16 = 1 << 1
VFIO_DEVICE_IOEVENTFD_32 = 1 << 2
VFIO_DEVICE_IOEVENTFD_64 = 1 << 3
VFIO_DEVICE_IOEVENTFD_SIZE_MASK = 0xF

VFIO_DEVICE_IOEVENTFD = _IO(VFIO_TYPE, VFIO_BASE + 16)


class vfio_device_feature(ctypes.Structure):
    """Followed by the feature's data (``data[]``), e.g. vfio_device_feature_mig_state."""

    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),  # feature index | GET/SET/PROBE
    ]


class VfioDeviceFeatureFlag(IntFlag):
    MASK = 0xFFFF  # the feature index (VfioDeviceFeature)
    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


VFIO_DEVICE_FEATURE = _IO(VFIO_TYPE, VFIO_BASE + 17)


class vfio_device_bind_iommufd(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("iommufd", c_int32),
        ("out_devid", c_uint32),  # the device's id in the iommufd
        ("token_uuid_ptr", c_uint64),  # with VFIO_DEVICE_BIND_FLAG_TOKEN: 16-byte VF token
    ]


class VfioDeviceBindFlag(IntFlag):
    TOKEN = 1 << 0


VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)


class vfio_device_attach_iommufd_pt(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("pt_id", c_uint32),  # in: IOAS or HWPT id; out: the HWPT actually attached
        ("pasid", c_uint32),  # with VFIO_DEVICE_ATTACH_PASID
    ]


VFIO_DEVICE_ATTACH_PASID = 1 << 0

VFIO_DEVICE_ATTACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 19)


class vfio_device_detach_iommufd_pt(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("pasid", c_uint32),  # with VFIO_DEVICE_DETACH_PASID
    ]


VFIO_DEVICE_DETACH_PASID = 1 << 0

VFIO_DEVICE_DETACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 20)


class VfioDeviceFeature(IntEnum):
    """Feature indexes for VFIO_DEVICE_FEATURE (the low 16 bits of ``flags``)."""

    PCI_VF_TOKEN = 0  # data: 16-byte UUID
    MIGRATION = 1  # data: vfio_device_feature_migration
    MIG_DEVICE_STATE = 2  # data: vfio_device_feature_mig_state
    LOW_POWER_ENTRY = 3  # no data
    LOW_POWER_ENTRY_WITH_WAKEUP = 4  # data: vfio_device_low_power_entry_with_wakeup
    LOW_POWER_EXIT = 5  # no data
    DMA_LOGGING_START = 6  # data: vfio_device_feature_dma_logging_control
    DMA_LOGGING_STOP = 7  # no data
    DMA_LOGGING_REPORT = 8  # data: vfio_device_feature_dma_logging_report
    MIG_DATA_SIZE = 9  # data: vfio_device_feature_mig_data_size
    BUS_MASTER = 10  # data: vfio_device_feature_bus_master
    DMA_BUF = 11  # data: vfio_device_feature_dma_buf; returns a dma-buf fd
    MIG_PRECOPY_INFOv2 = 12  # SET: vfio_precopy_info.flags becomes valid output
    ZPCI_ERROR = 13  # data: vfio_device_feature_zpci_err


class vfio_device_feature_migration(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint64),
    ]


class VfioMigrationFlag(IntFlag):
    STOP_COPY = 1 << 0  # STOP, STOP_COPY, RESUMING (always, if migration is supported)
    P2P = 1 << 1  # RUNNING_P2P
    PRE_COPY = 1 << 2  # PRE_COPY (and PRE_COPY_P2P with P2P)


class vfio_device_feature_mig_state(ctypes.Structure):
    _fields_ = [
        ("device_state", c_uint32),  # VfioDeviceState
        ("data_fd", c_int32),  # out: the migration data fd, if the arc starts a transfer
    ]


class VfioDeviceState(IntEnum):
    """enum vfio_device_mig_state: the device migration state machine."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


VFIO_DEVICE_STATE_NR = 8


class vfio_precopy_info(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("initial_bytes", c_uint64),
        ("dirty_bytes", c_uint64),
    ]


class VfioPrecopyInfoFlag(IntFlag):
    REINIT = 1 << 0  # new initial data is present (after MIG_PRECOPY_INFOv2 opt-in)


# On the migration data fd, in PRE_COPY states.
VFIO_MIG_GET_PRECOPY_INFO = _IO(VFIO_TYPE, VFIO_BASE + 21)


class vfio_device_low_power_entry_with_wakeup(ctypes.Structure):
    _fields_ = [
        ("wakeup_eventfd", c_int32),
        ("reserved", c_uint32),
    ]


class vfio_device_feature_dma_logging_control(ctypes.Structure):
    _fields_ = [
        ("page_size", c_uint64),
        ("num_ranges", c_uint32),
        ("__reserved", c_uint32),
        ("ranges", c_uint64),  # user pointer to vfio_device_feature_dma_logging_range[]
    ]


class vfio_device_feature_dma_logging_range(ctypes.Structure):
    _fields_ = [
        ("iova", c_uint64),
        ("length", c_uint64),
    ]


class vfio_device_feature_dma_logging_report(ctypes.Structure):
    _fields_ = [
        ("iova", c_uint64),
        ("length", c_uint64),
        ("page_size", c_uint64),
        ("bitmap", c_uint64),  # user pointer to the u64 bitmap, one bit per page_size
    ]


class vfio_device_feature_mig_data_size(ctypes.Structure):
    _fields_ = [
        ("stop_copy_length", c_uint64),
    ]


class vfio_device_feature_bus_master(ctypes.Structure):
    _fields_ = [
        ("op", c_uint32),
    ]


class VfioDeviceFeatureBusMasterOp(IntEnum):
    CLEAR_MASTER = 0
    SET_MASTER = 1


class vfio_region_dma_range(ctypes.Structure):
    _fields_ = [
        ("offset", c_uint64),
        ("length", c_uint64),
    ]


class vfio_device_feature_dma_buf(ctypes.Structure):
    """Followed by ``nr_ranges`` vfio_region_dma_range entries (``dma_ranges[]``)."""

    _fields_ = [
        ("region_index", c_uint32),
        ("open_flags", c_uint32),  # O_RDWR, O_CLOEXEC ...
        ("flags", c_uint32),
        ("nr_ranges", c_uint32),
        # Flexible array kept (zero length) because it gives the struct C's 8-byte alignment.
        ("dma_ranges", vfio_region_dma_range * 0),
    ]


class vfio_device_feature_zpci_err(ctypes.Structure):
    _fields_ = [
        ("data", c_uint64),
    ]


# -------- Type1 IOMMU (on the container) --------


class vfio_iommu_type1_info(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("iova_pgsizes", c_uint64),  # bitmap of supported page sizes
        ("cap_offset", c_uint32),
        ("pad", c_uint32),
    ]


class VfioIommuInfoFlag(IntFlag):
    PGSIZES = 1 << 0
    CAPS = 1 << 1


class VfioIommuType1InfoCap(IntEnum):
    """Capability ids in VFIO_IOMMU_GET_INFO's chain."""

    CAP_IOVA_RANGE = 1
    CAP_MIGRATION = 2
    DMA_AVAIL = 3


class vfio_iova_range(ctypes.Structure):
    _fields_ = [
        ("start", c_uint64),
        ("end", c_uint64),  # inclusive
    ]


class vfio_iommu_type1_info_cap_iova_range(ctypes.Structure):
    """Followed by ``nr_iovas`` vfio_iova_range entries (``iova_ranges[]``)."""

    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_iovas", c_uint32),
        ("reserved", c_uint32),
        # Flexible array kept (zero length) because it gives the struct C's 8-byte alignment.
        ("iova_ranges", vfio_iova_range * 0),
    ]


class vfio_iommu_type1_info_cap_migration(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("flags", c_uint32),
        ("pgsize_bitmap", c_uint64),
        ("max_dirty_bitmap_size", c_uint64),  # bytes
    ]


class vfio_iommu_type1_info_dma_avail(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("avail", c_uint32),  # DMA mappings still allowed
    ]


VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)


class vfio_iommu_type1_dma_map(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("vaddr", c_uint64),
        ("iova", c_uint64),
        ("size", c_uint64),
    ]


class VfioDmaMapFlag(IntFlag):
    READ = 1 << 0  # device may read
    WRITE = 1 << 1  # device may write
    VADDR = 1 << 2  # update the vaddr of an existing mapping


VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)


class vfio_bitmap(ctypes.Structure):
    _fields_ = [
        ("pgsize", c_uint64),  # bytes per bit
        ("size", c_uint64),  # bytes of bitmap
        ("data", ctypes.c_void_p),  # __u64 *: one bit per page
    ]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    """With GET_DIRTY_BITMAP, followed by a vfio_bitmap (``data[]``)."""

    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("iova", c_uint64),
        ("size", c_uint64),  # out: bytes unmapped
    ]


class VfioDmaUnmapFlag(IntFlag):
    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1  # iova and size must be 0
    VADDR = 1 << 2  # invalidate vaddrs only (VFIO_UPDATE_VADDR)


VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)

# SPAPR TCE only.
VFIO_IOMMU_ENABLE = _IO(VFIO_TYPE, VFIO_BASE + 15)
VFIO_IOMMU_DISABLE = _IO(VFIO_TYPE, VFIO_BASE + 16)


class vfio_iommu_type1_dirty_bitmap(ctypes.Structure):
    """With GET_BITMAP, followed by a vfio_iommu_type1_dirty_bitmap_get (``data[]``)."""

    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
    ]


class VfioIommuDirtyPagesFlag(IntFlag):
    START = 1 << 0
    STOP = 1 << 1
    GET_BITMAP = 1 << 2


class vfio_iommu_type1_dirty_bitmap_get(ctypes.Structure):
    _fields_ = [
        ("iova", c_uint64),
        ("size", c_uint64),
        ("bitmap", vfio_bitmap),
    ]


VFIO_IOMMU_DIRTY_PAGES = _IO(VFIO_TYPE, VFIO_BASE + 17)

# -------- SPAPR TCE (POWER) IOMMU, for completeness --------


class vfio_iommu_spapr_tce_ddw_info(ctypes.Structure):
    _fields_ = [
        ("pgsizes", c_uint64),
        ("max_dynamic_windows_supported", c_uint32),
        ("levels", c_uint32),
    ]


class vfio_iommu_spapr_tce_info(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("dma32_window_start", c_uint32),
        ("dma32_window_size", c_uint32),
        ("ddw", vfio_iommu_spapr_tce_ddw_info),
    ]


VFIO_IOMMU_SPAPR_INFO_DDW = 1 << 0

VFIO_IOMMU_SPAPR_TCE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)


class vfio_eeh_pe_err(ctypes.Structure):
    _fields_ = [
        ("type", c_uint32),
        ("func", c_uint32),
        ("addr", c_uint64),
        ("mask", c_uint64),
    ]


class _vfio_eeh_pe_op_u(ctypes.Union):
    _fields_ = [
        ("err", vfio_eeh_pe_err),
    ]


class vfio_eeh_pe_op(ctypes.Structure):
    _anonymous_ = ("_u",)
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("op", c_uint32),
        ("_u", _vfio_eeh_pe_op_u),
    ]


class VfioEehPeOp(IntEnum):
    DISABLE = 0
    ENABLE = 1
    UNFREEZE_IO = 2
    UNFREEZE_DMA = 3
    GET_STATE = 4
    RESET_DEACTIVATE = 5
    RESET_HOT = 6
    RESET_FUNDAMENTAL = 7
    CONFIGURE = 8
    INJECT_ERR = 9


class VfioEehPeState(IntEnum):
    NORMAL = 0
    RESET = 1
    STOPPED = 2
    STOPPED_DMA = 4
    UNAVAIL = 5


VFIO_EEH_PE_OP = _IO(VFIO_TYPE, VFIO_BASE + 21)


class vfio_iommu_spapr_register_memory(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("vaddr", c_uint64),
        ("size", c_uint64),
    ]


VFIO_IOMMU_SPAPR_REGISTER_MEMORY = _IO(VFIO_TYPE, VFIO_BASE + 17)
VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY = _IO(VFIO_TYPE, VFIO_BASE + 18)


class vfio_iommu_spapr_tce_create(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("page_shift", c_uint32),
        ("__resv1", c_uint32),
        ("window_size", c_uint64),
        ("levels", c_uint32),
        ("__resv2", c_uint32),
        ("start_addr", c_uint64),
    ]


VFIO_IOMMU_SPAPR_TCE_CREATE = _IO(VFIO_TYPE, VFIO_BASE + 19)


class vfio_iommu_spapr_tce_remove(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("start_addr", c_uint64),
    ]


VFIO_IOMMU_SPAPR_TCE_REMOVE = _IO(VFIO_TYPE, VFIO_BASE + 20)


C_PREFIX: dict[type, str | tuple[str, str]] = {
    VfioExtension: "VFIO_",
    VfioGroupFlag: "VFIO_GROUP_FLAGS_",
    VfioDeviceFlag: "VFIO_DEVICE_FLAGS_",
    VfioDeviceInfoCap: "VFIO_DEVICE_INFO_CAP_",
    VfioPciAtomicComp: "VFIO_PCI_ATOMIC_",
    VfioRegionInfoFlag: "VFIO_REGION_INFO_FLAG_",
    VfioRegionInfoCap: "VFIO_REGION_INFO_CAP_",
    VfioRegionType: "VFIO_REGION_TYPE_",
    VfioIrqInfoFlag: "VFIO_IRQ_INFO_",
    VfioIrqSetFlag: "VFIO_IRQ_SET_",
    VfioPciRegion: ("VFIO_PCI_", "_REGION_INDEX"),
    VfioPciIrq: ("VFIO_PCI_", "_IRQ_INDEX"),
    VfioCcwIrq: ("VFIO_CCW_", "_IRQ_INDEX"),
    VfioApIrq: ("VFIO_AP_", "_IRQ_INDEX"),
    VfioPciHotResetFlag: "VFIO_PCI_HOT_RESET_FLAG_",
    VfioGfxPlaneType: "VFIO_GFX_PLANE_TYPE_",
    VfioDeviceFeatureFlag: "VFIO_DEVICE_FEATURE_",
    VfioDeviceBindFlag: "VFIO_DEVICE_BIND_FLAG_",
    VfioDeviceFeature: "VFIO_DEVICE_FEATURE_",
    VfioMigrationFlag: "VFIO_MIGRATION_",
    VfioDeviceState: "VFIO_DEVICE_STATE_",
    VfioPrecopyInfoFlag: "VFIO_PRECOPY_INFO_",
    VfioDeviceFeatureBusMasterOp: "VFIO_DEVICE_FEATURE_",
    VfioIommuInfoFlag: "VFIO_IOMMU_INFO_",
    VfioIommuType1InfoCap: "VFIO_IOMMU_TYPE1_INFO_",
    VfioDmaMapFlag: "VFIO_DMA_MAP_FLAG_",
    VfioDmaUnmapFlag: "VFIO_DMA_UNMAP_FLAG_",
    VfioIommuDirtyPagesFlag: "VFIO_IOMMU_DIRTY_PAGES_FLAG_",
    VfioEehPeOp: "VFIO_EEH_PE_",
    VfioEehPeState: "VFIO_EEH_PE_STATE_",
}

register_names(globals(), "VFIO_", VFIO_TYPE)
