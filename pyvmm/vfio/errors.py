"""VFIO errors the user can act on."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Mapping

from pyvmm.errors import PyvmmError
from pyvmm.uapi.ioctl import IoctlError, ioctl


class VfioError(PyvmmError):
    """A VFIO device, group or container cannot be used as asked; the message says why."""


def open_node(path: str, what: str, missing_hint: str) -> int:
    """Open a VFIO or iommufd device node read-write, with a one-line error that says what to do
    when it cannot be."""
    if not path or path.endswith("/"):
        raise VfioError(f"{what}: no device node given")
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VfioError(f"{what}: {path} does not exist; {missing_hint}") from None
    except PermissionError:
        raise VfioError(f"{what}: no permission to open {path}; run as root") from None
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise VfioError(
                f"{what}: {path} is busy: already open (in this process or another), or its "
                "device is open through another interface"
            ) from None
        raise VfioError(f"{what}: cannot open {path}: {err.strerror}") from None


_DMA_MAP_HINTS = {
    # pinned pages count against RLIMIT_MEMLOCK, in both backends
    errno.ENOMEM: " (the locked-memory limit? see ulimit -l)",
    # the legacy backend counts its mappings
    errno.ENOSPC: " (too many DMA mappings: vfio_iommu_type1's dma_entry_limit)",
}


def dma_map_error(err: OSError) -> str:
    """Why a DMA map failed, with the usual cause of the errors that have one."""
    return f"{os.strerror(err.errno or 0)}{_DMA_MAP_HINTS.get(err.errno or 0, '')}"


def errno_reason(err: OSError, known: Mapping[int, str]) -> str:
    """What an ioctl's errno means for the step that failed (`known`), else the OS's words."""
    return known.get(err.errno or 0, os.strerror(err.errno or 0))


def checked_ioctl(
    fd: int, request: int, arg: ctypes.Structure, failed: str, known: Mapping[int, str]
) -> None:
    """One ioctl whose failure the user must hear of: a VfioError `failed: why` (the errno's
    meaning for this step from `known`, else the OS's words)."""
    try:
        ioctl(fd, request, arg)
    except IoctlError as err:
        raise VfioError(f"{failed}: {errno_reason(err, known)}") from None
