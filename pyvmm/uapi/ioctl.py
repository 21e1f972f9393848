"""Linux ioctl request-number encoding (include/uapi/asm-generic/ioctl.h) and the ioctl call.

Every uAPI module builds its request numbers with `_IO`, `_IOR`, `_IOW` and `_IOWR` exactly as the
C headers do, so that a number can be checked against the header with a compiled probe.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from pyvmm.libc import libc

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2


def _size(arg: Any) -> int:
    return arg if isinstance(arg, int) else ctypes.sizeof(arg)


def _IOC(direction: int, ioc_type: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit the encoding")
    return (
        (direction << _IOC_DIRSHIFT)
        | (ioc_type << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(ioc_type: int, nr: int) -> int:
    return _IOC(IOC_NONE, ioc_type, nr, 0)


def _IOR(ioc_type: int, nr: int, argtype: Any) -> int:
    return _IOC(IOC_READ, ioc_type, nr, _size(argtype))


def _IOW(ioc_type: int, nr: int, argtype: Any) -> int:
    return _IOC(IOC_WRITE, ioc_type, nr, _size(argtype))


def _IOWR(ioc_type: int, nr: int, argtype: Any) -> int:
    return _IOC(IOC_READ | IOC_WRITE, ioc_type, nr, _size(argtype))


class IoctlError(OSError):
    """An ioctl failed. Carries the request's name and the kernel's errno."""

    def __init__(self, name: str, errno: int, detail: str = "") -> None:
        what = f"{name} failed: {os.strerror(errno)} (errno {errno})"
        if detail:
            what = f"{what}: {detail}"
        super().__init__(errno, what)
        self.request_name = name

    def __str__(self) -> str:
        return self.strerror or super().__str__()


libc_ioctl = libc.ioctl

_NAMES: dict[int, str] = {}


def register_names(namespace: dict[str, Any], prefix: str, ioc_type: int) -> None:
    """Remember the names of a uAPI module's request numbers, for error messages.

    A request is recognised by its encoded type byte (KVMIO, VFIO_TYPE, IOMMUFD_TYPE), not by
    its size: most VFIO and iommufd requests are `_IO` numbers below 0x10000.
    """
    for key, value in namespace.items():
        if (
            key.startswith(prefix)
            and isinstance(value, int)
            and 0 <= value < 1 << 32
            and (value >> _IOC_TYPESHIFT) & 0xFF == ioc_type
        ):
            _NAMES.setdefault(value, key)


def request_name(request: int) -> str:
    return _NAMES.get(request, f"ioctl {request:#x}")


def ioctl(fd: int, request: int, arg: Any = None, *, name: str | None = None) -> int:
    """Issue one ioctl; return its non-negative result or raise `IoctlError`.

    `arg` is a ctypes object (passed by reference), an int (passed by value) or None. The GIL is
    released for the call, and EINTR is returned to the caller as an `IoctlError` rather than
    retried: a vCPU kick relies on that.
    """
    if arg is None:
        argp: Any = None
    elif isinstance(arg, int):
        argp = ctypes.c_void_p(arg)
    else:
        argp = ctypes.byref(arg)
    result = libc_ioctl(fd, request, argp)
    if result < 0:
        err = ctypes.get_errno()
        raise IoctlError(name or request_name(request), err)
    return result
