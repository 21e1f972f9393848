"""The ctypes uAPI modules (pyvmm/uapi/*.py) against the Linux 7.3 C headers.

Each module is checked by a C probe generated from it and compiled against the headers that
scripts/fetch-uapi-headers provides (see tests/abiprobe.py for what is checked and the
conventions it relies on). Missing gcc or headers fail the test: scripts/setup installs them.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import importlib
import pkgutil
import shutil
import subprocess
import types
from ctypes import c_uint8, c_uint32, c_uint64
from pathlib import Path

import abiprobe
import pytest

import pyvmm.uapi
from pyvmm.uapi.ioctl import _IO, _IOR, _IOW, _IOWR

ROOT = Path(__file__).resolve().parents[1]

# Every module of pyvmm/uapi mirrors kernel headers, except the ioctl encoder itself (tested below).
NOT_ABI_MODULES = {"ioctl"}
UAPI_MODULES = sorted(
    info.name
    for info in pkgutil.iter_modules(pyvmm.uapi.__path__)
    if info.name not in NOT_ABI_MODULES
)
NEEDED_HEADERS = ("linux/kvm.h", "linux/vfio.h", "linux/iommufd.h", "iommufd_test.h")


@functools.cache
def _include_dir() -> Path:
    """The uAPI include directory; fails (never skips) the calling test if the tools are missing."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is not installed; the ABI probe needs it (run scripts/setup)")
    try:
        import elftools  # noqa: F401
    except ImportError:
        pytest.fail("pyelftools is not installed; the ABI probe needs it (run scripts/setup)")
    script = ROOT / "scripts" / "fetch-uapi-headers"
    result = subprocess.run([str(script)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"scripts/fetch-uapi-headers failed (run scripts/setup):\n{result.stderr}")
    path = Path(result.stdout.strip())
    missing = [h for h in NEEDED_HEADERS if not (path / h).is_file()]
    if missing:
        pytest.fail(f"headers missing from {path}: {', '.join(missing)} (run scripts/setup)")
    return path


def test_uapi_modules_are_discovered() -> None:
    assert {"kvm", "vfio", "iommufd"} <= set(UAPI_MODULES)


@pytest.mark.parametrize("name", UAPI_MODULES)
def test_uapi_module_matches_c_headers(name: str, tmp_path: Path) -> None:
    include_dir = _include_dir()
    module = importlib.import_module(f"pyvmm.uapi.{name}")
    problems = abiprobe.check_module(module, include_dir, tmp_path)
    if problems:
        pytest.fail(
            f"pyvmm.uapi.{name} differs from the C headers ({len(problems)} problems):\n  "
            + "\n  ".join(problems),
            pytrace=False,
        )


# ---- the probe itself must catch every kind of mismatch ----


def _fake_module() -> types.ModuleType:
    """A uAPI module with one deliberate error of each kind next to correct entries."""
    module = types.ModuleType("fake_uapi")

    def own(cls: type) -> type:
        cls.__module__ = module.__name__
        setattr(module, cls.__name__, cls)
        return cls

    module.C_HEADERS = ("linux/kvm.h", "linux/vfio.h", "linux/iommufd.h")
    module.C_COMPLETE_HEADERS = ("linux/iommufd.h",)

    @own
    class vfio_device_info(ctypes.Structure):  # flags too wide, num_irqs misspelled, no pad
        _fields_ = [
            ("argsz", c_uint32),
            ("flags", c_uint64),
            ("num_regions", c_uint32),
            ("num_irq", c_uint32),
            ("cap_offset", c_uint32),
        ]

    @own
    class iommu_hw_info_tegra241_cmdqv(ctypes.Structure):  # __reserved fits in tail padding
        _fields_ = [
            ("flags", c_uint32),
            ("version", c_uint8),
            ("log2vcmdqs", c_uint8),
            ("log2vsids", c_uint8),
        ]

    @own
    class vfio_group_status(ctypes.Union):  # a struct in C
        _fields_ = [("argsz", c_uint32), ("flags", c_uint32)]

    class _dependent_id(ctypes.Union):
        _fields_ = [("group_id", c_uint32), ("devid", c_uint32)]

    @own
    class vfio_pci_dependent_device(ctypes.Structure):  # correct, with an anonymous union
        _anonymous_ = ("_id",)
        _fields_ = [
            ("_id", _dependent_id),
            ("segment", ctypes.c_uint16),
            ("bus", c_uint8),
            ("devfn", c_uint8),
        ]

    class _redirtbl_fields(ctypes.Structure):
        _fields_ = [
            ("vector", c_uint8),
            ("delivery_mode", c_uint8, 4),  # 3 in C
            ("dest_mode", c_uint8, 1),
            ("delivery_status", c_uint8, 1),
            ("polarity", c_uint8, 1),
            ("remote_irr", c_uint8, 1),
            ("trig_mode", c_uint8, 1),
            ("mask", c_uint8, 1),
            ("reserve", c_uint8, 7),
            ("reserved", c_uint8 * 4),
            ("dest_id", c_uint8),
        ]

    class _redirtbl(ctypes.Union):
        _fields_ = [("bits", c_uint64), ("fields", _redirtbl_fields)]

    @own
    class kvm_ioapic_state(ctypes.Structure):
        _fields_ = [
            ("base_address", c_uint64),
            ("ioregsel", c_uint32),
            ("id", c_uint32),
            ("irr", c_uint32),
            ("pad", c_uint32),
            ("redirtbl", _redirtbl * 24),
        ]

    @own
    class RegionFlag(enum.IntFlag):
        READ = 1
        WRITE = 4  # 2 in C
        BOGUS = 8  # no such C name

    @own
    class Unprefixed(enum.IntEnum):
        A = 1

    module.C_PREFIX = {RegionFlag: "VFIO_REGION_INFO_FLAG_"}
    module.VFIO_API_VERSION = 1  # 0 in C
    module.VFIO_DEVICE_API_PCI_STRING = "vfio_pci"  # "vfio-pci" in C
    module.VFIO_PCI_DEVID_NOT_OWNED = 0xFFFFFFFF  # -1 in C: same bits at the C width, correct
    module.VFIO_REGION_TYPE_PCI_VENDOR_TYPE = 1 << 32  # too wide for C's int
    module.VFIO_GET_API_VERSION = _IO(ord(";"), 100)  # correct
    return module


def test_probe_reports_every_kind_of_mismatch(tmp_path: Path) -> None:
    problems = abiprobe.check_module(_fake_module(), _include_dir(), tmp_path)
    text = "\n".join(problems)
    expected = [
        "struct vfio_device_info.flags: size: C 4, Python 8",
        "struct vfio_device_info.num_regions: offset: C 8, Python 0x10 (16)",
        "struct vfio_device_info.num_irq: offset: not valid in C",
        "struct vfio_device_info: sizeof: C 0x18 (24), Python 0x20 (32)",
        "struct vfio_device_info: alignment: C 4, Python 8",
        "struct vfio_device_info: C member 'num_irqs' is missing in Python",
        "struct vfio_device_info: C member 'pad' is missing in Python",
        "struct iommu_hw_info_tegra241_cmdqv: C member '__reserved' is missing in Python",
        "union vfio_group_status: sizeof: not valid in C",
        "struct kvm_ioapic_state.redirtbl[0].fields.delivery_mode: bits: C bits 200-202, "
        "Python bits 200-203",
        "RegionFlag.WRITE (VFIO_REGION_INFO_FLAG_WRITE): C 2, Python 4",
        "RegionFlag.BOGUS (VFIO_REGION_INFO_FLAG_BOGUS): not valid in C",
        "enum class Unprefixed has no C_PREFIX entry",
        "VFIO_API_VERSION: C 0, Python 1",
        "VFIO_DEVICE_API_PCI_STRING: C b'vfio-pci', Python b'vfio_pci'",
        "VFIO_REGION_TYPE_PCI_VENDOR_TYPE: C 0x80000000 (2147483648) = -2147483648, Python",
        "struct iommu_destroy (linux/iommufd.h) has no Python class",
        "IOMMU_DESTROY (linux/iommufd.h) is not in the module",
        "IOMMU_HWPT_DATA_VTD_S1 (linux/iommufd.h) is not in the module",
    ]
    missed = [e for e in expected if e not in text]
    assert not missed, f"the probe missed: {missed}\nit reported:\n{text}"
    for correct in ("vfio_pci_dependent_device", "VFIO_PCI_DEVID_NOT_OWNED", "RegionFlag.READ"):
        assert correct not in text
    assert "fields.vector" not in text
    assert "VFIO_GET_API_VERSION" not in text


# ---- the ioctl number encoding, against numbers known from the kernel ----


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (_IO(0xAE, 0x00), 0xAE00),  # KVM_GET_API_VERSION
        (_IO(0xAE, 0x80), 0xAE80),  # KVM_RUN
        (_IOW(0xAE, 0x46, 32), 0x4020AE46),  # KVM_SET_USER_MEMORY_REGION
        (_IOR(0xAE, 0x81, 144), 0x8090AE81),  # KVM_GET_REGS
        (_IOW(0xAE, 0x82, 144), 0x4090AE82),  # KVM_SET_REGS
        (_IOWR(0xAE, 0x67, 8), 0xC008AE67),  # KVM_IRQ_LINE_STATUS
        (_IOR(0xAE, 0x83, 312), 0x8138AE83),  # KVM_GET_SREGS
        (_IO(ord(";"), 100), 0x3B64),  # VFIO_GET_API_VERSION
        (_IO(ord(";"), 100 + 17), 0x3B75),  # VFIO_DEVICE_FEATURE
        (_IO(ord(";"), 0x80), 0x3B80),  # IOMMU_DESTROY
    ],
)
def test_ioctl_encoding(number: int, expected: int) -> None:
    assert number == expected


def test_ioctl_encoding_takes_ctypes_sizes() -> None:
    class twelve(ctypes.Structure):
        _fields_ = [("a", c_uint32 * 3)]

    assert _IOWR(0xAE, 0x10, twelve) == _IOWR(0xAE, 0x10, 12) == 0xC00CAE10


def test_ioctl_encoding_rejects_oversized_arguments() -> None:
    with pytest.raises(ValueError):
        _IOR(0xAE, 0x01, 1 << 14)


def test_known_uapi_numbers() -> None:
    from pyvmm.uapi import iommufd, vfio

    assert vfio.VFIO_GET_API_VERSION == 0x3B64
    assert vfio.VFIO_DEVICE_FEATURE == 0x3B75
    assert vfio.VFIO_DEVICE_BIND_IOMMUFD == 0x3B76
    assert iommufd.IOMMU_IOAS_ALLOC == 0x3B81
    assert iommufd.IOMMU_TEST_CMD == 0x3BA0


# ---- the C exit loop reads kvm_run by the kernel's header; its offsets must be pyvmm.uapi's ----


def test_the_c_exit_loop_reads_kvm_run_where_pyvmm_uapi_says() -> None:
    from pyvmm.kvm.exitloop import ffi, lib
    from pyvmm.uapi import kvm as uapi

    run, union = uapi.kvm_run, uapi.kvm_run._exit.offset
    io, mmio = uapi._kvm_run_io, uapi._kvm_run_mmio
    expected = [
        run.exit_reason.offset,
        run.immediate_exit.offset,
        *(union + getattr(io, f).offset for f in ("direction", "size", "port", "count")),
        union + io.data_offset.offset,
        *(union + getattr(mmio, f).offset for f in ("phys_addr", "data", "len", "is_write")),
    ]
    compiled = ffi.new("uint32_t[11]")
    lib.pyvmm_exitloop_offsets(compiled)
    assert list(compiled) == expected
