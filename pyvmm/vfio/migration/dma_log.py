"""A device's own DMA dirty tracking (VFIO_DEVICE_FEATURE_DMA_LOGGING_START/REPORT/STOP).

A device that migrates may also log which pages it writes by DMA, in the device itself (mlx5's
and the mtty sample's drivers have the ops): START gives it the IOVA ranges to watch and the
page size of its log (a SET), REPORT (a GET) reads and clears the log of one range into a
bitmap (one bit per page, in u64s, little-endian: on x86 the same bytes as KVM's dirty
bitmaps), STOP ends it. The
guest's RAM is mapped for DMA at IOVA = GPA, so the ranges are the RAM regions and a report is
already in guest pages. The kernel bounds the ranges (vfio_ioctl_device_feature_logging_start:
at most LOG_MAX_RANGES, none overlapping, and a page size that is a power of two), and so do we.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.uapi import vfio as uapi
from pyvmm.uapi.ioctl import IoctlError
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.migration.device import feature

PAGE_SIZE = 4096
MAX_RANGES = 256  # the kernel's LOG_MAX_RANGES


@dataclass(frozen=True)
class LoggedPages:
    """What one range's report found: bit i of `bitmap` is the page at gpa + i * 4096."""

    gpa: int
    pages: int
    bitmap: bytes


class _NoData(ctypes.Structure):
    _fields_: list[tuple[str, type]] = []


def supported(device: VfioDevice) -> bool:
    """Whether the device's driver has DMA logging (a PROBE of DMA_LOGGING_START)."""
    try:
        feature(
            device,
            uapi.VfioDeviceFeature.DMA_LOGGING_START,
            uapi.VfioDeviceFeatureFlag.PROBE | uapi.VfioDeviceFeatureFlag.SET,
            _NoData(),
        )
    except IoctlError:
        return False
    return True


class DeviceDmaLog:
    """The DMA log of `device` over the RAM `mapped()` lists ({gpa: size}, mapped for DMA at
    IOVA = GPA): a source of the machine's dirty log (pyvmm.machine.dirty.DirtySource)."""

    def __init__(self, device: VfioDevice, mapped: Callable[[], dict[int, int]]) -> None:
        self.device = device
        self._mapped = mapped
        self._ranges: list[tuple[int, int]] = []  # what START was given, while logging

    @property
    def logging(self) -> bool:
        return bool(self._ranges)

    def start(self) -> None:
        ranges = sorted(self._mapped().items())
        if not ranges or len(ranges) > MAX_RANGES:
            raise VfioError(
                f"{self.device.name}: DMA logging needs 1 to {MAX_RANGES} RAM ranges, not "
                f"{len(ranges)}"
            )
        table = (uapi.vfio_device_feature_dma_logging_range * len(ranges))(
            *(uapi.vfio_device_feature_dma_logging_range(gpa, size) for gpa, size in ranges)
        )
        control = uapi.vfio_device_feature_dma_logging_control(
            page_size=PAGE_SIZE, num_ranges=len(ranges), ranges=ctypes.addressof(table)
        )
        self._ask(uapi.VfioDeviceFeature.DMA_LOGGING_START, control, "start")
        self._ranges = ranges

    def collect(self) -> list[LoggedPages]:
        """What the device wrote since the start or the last collect, per range."""
        found = []
        for gpa, size in self._ranges:
            pages = size // PAGE_SIZE
            bitmap = (ctypes.c_uint64 * ((pages + 63) // 64))()
            report = uapi.vfio_device_feature_dma_logging_report(
                iova=gpa, length=size, page_size=PAGE_SIZE, bitmap=ctypes.addressof(bitmap)
            )
            self._ask(uapi.VfioDeviceFeature.DMA_LOGGING_REPORT, report, "report", get=True)
            found.append(LoggedPages(gpa, pages, bytes(bitmap)[: (pages + 7) // 8]))
        return found

    def stop(self) -> None:
        if not self._ranges:
            return
        self._ranges = []
        self._ask(uapi.VfioDeviceFeature.DMA_LOGGING_STOP, _NoData(), "stop")

    def _ask(
        self, index: uapi.VfioDeviceFeature, data: ctypes.Structure, doing: str, get: bool = False
    ) -> None:
        """A SET of the feature (START, STOP), or a GET (REPORT: it fills in the bitmap)."""
        flag = uapi.VfioDeviceFeatureFlag.GET if get else uapi.VfioDeviceFeatureFlag.SET
        try:
            feature(self.device, index, flag, data)
        except IoctlError as err:
            raise VfioError(f"{self.device.name}: DMA logging {doing} failed: {err}") from None
