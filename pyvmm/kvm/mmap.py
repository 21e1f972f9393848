"""mmap/munmap through libc, so that pyvmm knows and controls the host address of a mapping.

Python's `mmap.mmap` hides its address and refuses to close while a ctypes view exports it; KVM
memory slots, VFIO DMA maps and migration all need the raw address, so pyvmm maps memory itself and
wraps it in a `Mapping` that gives a bounds-checked memoryview.
"""

from __future__ import annotations

import ctypes
import mmap as _mmap
import os

from pyvmm.libc import libc

MADV_REMOVE = 9  # linux/mman.h
MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14

PAGE_SIZE = 4096  # x86-64's base page: KVM slots, dirty-log bits and DMA maps count in it
MAP_FAILED = ctypes.c_void_p(-1).value


def populate_write(addr: int, size: int) -> None:
    """Fault pages of a mapping in for writing, in the kernel (MADV_POPULATE_WRITE): their
    page-table entries are then there when KVM or the guest first touches them. A kernel
    that cannot (before 5.14) refuses, which is harmless: the pages fault in on first touch,
    as they always did."""
    libc.madvise(addr, size, MADV_POPULATE_WRITE)


def remove_pages(addr: int, size: int) -> None:
    """Drop the pages of a shared mapping and their backing (MADV_REMOVE: a memfd's range
    becomes a hole, read as missing again, by the mapping and by KVM's page tables)."""
    if libc.madvise(addr, size, MADV_REMOVE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_REMOVE) at {addr:#x}+{size:#x}: {os.strerror(err)}")


class Mapping:
    """One mmap'd range of host memory; `view` is a byte memoryview over it."""

    def __init__(
        self,
        size: int,
        fd: int = -1,
        offset: int = 0,
        *,
        prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE,
        flags: int = _mmap.MAP_SHARED,
    ) -> None:
        if fd < 0:
            flags |= _mmap.MAP_ANONYMOUS
        addr = libc.mmap(None, size, prot, flags, fd, offset)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {size} bytes failed: {os.strerror(err)}")
        self.addr: int = addr
        self.size = size
        self.view = memoryview((ctypes.c_ubyte * size).from_address(addr)).cast("B")

    def close(self) -> None:
        """Unmap. Any memoryview taken from `view` must no longer be used."""
        if self.addr:
            self.view.release()
            libc.munmap(self.addr, self.size)
            self.addr = 0

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
