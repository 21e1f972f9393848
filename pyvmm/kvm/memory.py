"""Guest RAM: memfd-backed shared mappings registered with KVM as memory slots.

RAM lives in a memfd so that it can be shared: with VFIO (DMA maps of the same pages), with a
snapshot (the fd's contents are the RAM image) and with a migration peer. Each `RamRegion` is one
KVM memory slot at one guest-physical address.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

from pyvmm.kvm.mmap import Mapping

PAGE_SIZE = 4096


@dataclass(frozen=True)
class RamRange:
    """A guest-physical range of RAM."""

    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class RamRegion:
    """A memfd of `size` bytes mapped shared into this process, for one KVM memory slot."""

    def __init__(self, slot: int, gpa: int, size: int, name: str = "pyvmm-ram") -> None:
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise ValueError(f"RAM region {gpa:#x}+{size:#x} is not page aligned")
        self.slot = slot
        self.gpa = gpa
        self.size = size
        self.memfd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.memfd, size)
            self.mapping = Mapping(size, self.memfd)
        except BaseException:
            os.close(self.memfd)
            raise

    @property
    def host_addr(self) -> int:
        return self.mapping.addr

    @property
    def view(self) -> memoryview:
        return self.mapping.view

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def close(self) -> None:
        self.mapping.close()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


class GuestMemoryError(ValueError):
    """A guest-physical access fell outside guest RAM."""


class GuestMemory:
    """All RAM regions of a VM, with bounds-checked guest-physical reads and writes."""

    def __init__(self) -> None:
        self.regions: list[RamRegion] = []

    def add(self, region: RamRegion) -> None:
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)

    def region_for(self, gpa: int, length: int = 1) -> RamRegion:
        for region in self.regions:
            if region.contains(gpa, length):
                return region
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is not RAM")

    def slice(self, gpa: int, length: int) -> memoryview:
        """A view of guest RAM at `gpa`; the whole range must lie inside one region."""
        region = self.region_for(gpa, length)
        start = gpa - region.gpa
        return region.view[start : start + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.slice(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.slice(gpa, len(data))[:] = data

    def fill_from(self, gpa: int, file: BinaryIO, length: int) -> int:
        """Read up to `length` bytes of `file` straight into RAM at `gpa` (no copy through a
        bytes object: kernels are megabytes); returns how many bytes the file had."""
        view = self.slice(gpa, length)
        done = 0
        while done < length:
            count = file.readinto(view[done:])
            if not count:
                break
            done += count
        return done

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions.clear()
