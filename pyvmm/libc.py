"""The C library, loaded once, with the prototypes of the calls pyvmm makes that `os` lacks:
ioctl, mmap, munmap, madvise, memcmp, pthread_sigmask and syscall. Calls through it release the
GIL (a vCPU's KVM_RUN, a page fault served by a userfaultfd, a look at megabytes of guest RAM)
and set errno for `ctypes.get_errno`."""

from __future__ import annotations

import ctypes


def _load() -> ctypes.CDLL:
    """glibc by its soname; else the library search (which runs `ldconfig -p`: milliseconds of
    start-up that every `pyvmm` command would otherwise pay)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c"), use_errno=True)


libc = _load()

libc.ioctl.restype = ctypes.c_int
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.munmap.restype = ctypes.c_int
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.memcmp.restype = ctypes.c_int
libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
libc.syscall.restype = ctypes.c_long
