"""userfaultfd uAPI (include/uapi/linux/userfaultfd.h, Linux 7.3): what post-copy migration uses.

A userfaultfd takes over the page faults of the memory ranges registered with it: a thread that
touches a missing page of such a range (a vCPU too, inside KVM) sleeps until the fd's reader
fills the page (``UFFDIO_COPY``, or ``UFFDIO_ZEROPAGE``) and wakes it. The fd comes from the
``userfaultfd`` system call or, for a user without CAP_SYS_PTRACE where
vm.unprivileged_userfaultfd is 0, from ``USERFAULTFD_IOC_NEW`` on ``/dev/userfaultfd``; it is
unusable until the ``UFFDIO_API`` handshake has agreed on the API and the features (a missing
page of shmem, as memfd RAM is, needs ``UFFD_FEATURE_MISSING_SHMEM``). Each ``read`` returns
whole ``uffd_msg`` records.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int64, c_uint8, c_uint16, c_uint32, c_uint64

from pyvmm.uapi.ioctl import _IO, _IOR, _IOWR, register_names

#: The header uses _IO* without including their definitions (users include them first).
C_HEADERS = ("linux/ioctl.h", "linux/userfaultfd.h")

USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)
UFFDIO = 0xAA
UFFD_API = 0xAA

# UFFDIO_API features
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_THREAD_ID = 1 << 8

# events and their flags
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0

# modes
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0

# the ioctl numbers, as bits of uffdio_api.ioctls and uffdio_register.ioctls
_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_API = 0x3F


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", c_uint64), ("features", c_uint64), ("ioctls", c_uint64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", c_uint64), ("len", c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_uint64), ("ioctls", c_uint64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [
        ("dst", c_uint64),
        ("src", c_uint64),
        ("len", c_uint64),
        ("mode", c_uint64),
        ("copy", c_int64),  # out: bytes copied, or -errno
    ]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_uint64), ("zeropage", c_int64)]


class _PagefaultFeat(ctypes.Union):
    _fields_ = [("ptid", c_uint32)]


class _Pagefault(ctypes.Structure):
    _fields_ = [("flags", c_uint64), ("address", c_uint64), ("feat", _PagefaultFeat)]


class _Fork(ctypes.Structure):
    _fields_ = [("ufd", c_uint32)]


class _Remap(ctypes.Structure):
    _fields_ = [("from", c_uint64), ("to", c_uint64), ("len", c_uint64)]


class _Remove(ctypes.Structure):
    _fields_ = [("start", c_uint64), ("end", c_uint64)]


class _Reserved(ctypes.Structure):
    _fields_ = [("reserved1", c_uint64), ("reserved2", c_uint64), ("reserved3", c_uint64)]


class _MsgArg(ctypes.Union):
    _fields_ = [
        ("pagefault", _Pagefault),
        ("fork", _Fork),
        ("remap", _Remap),
        ("remove", _Remove),
        ("reserved", _Reserved),
    ]


class uffd_msg(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed))
    _fields_ = [
        ("event", c_uint8),
        ("reserved1", c_uint8),
        ("reserved2", c_uint16),
        ("reserved3", c_uint32),
        ("arg", _MsgArg),
    ]


UFFDIO_API = _IOWR(UFFDIO, _UFFDIO_API, uffdio_api)
UFFDIO_REGISTER = _IOWR(UFFDIO, _UFFDIO_REGISTER, uffdio_register)
UFFDIO_UNREGISTER = _IOR(UFFDIO, _UFFDIO_UNREGISTER, uffdio_range)
UFFDIO_WAKE = _IOR(UFFDIO, _UFFDIO_WAKE, uffdio_range)
UFFDIO_COPY = _IOWR(UFFDIO, _UFFDIO_COPY, uffdio_copy)
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, uffdio_zeropage)

register_names(globals(), "UFFDIO_", UFFDIO)
