"""VFIO info capability chains as the kernel lays them out, and malformed ones (no kernel needed:
the chains are parsed from bytes; the lab tests read real ones)."""

from __future__ import annotations

import ctypes
import struct

import pytest

from pyvmm.uapi import vfio as uapi
from pyvmm.vfio import device as device_module
from pyvmm.vfio.device import Region, VfioDevice, capability_chain, sparse_mmap_areas
from pyvmm.vfio.errors import VfioError

HEADER = struct.Struct("<HHI")  # vfio_info_cap_header: id, version, next


def chain(*caps: tuple[int, int, bytes]) -> bytes:
    """A buffer with a 32-byte info struct, then capabilities at the given offsets."""
    size = max(offset + HEADER.size + len(body) for offset, _, body in caps)
    buffer = bytearray(size)
    for i, (offset, cap_id, body) in enumerate(caps):
        following = caps[i + 1][0] if i + 1 < len(caps) else 0
        buffer[offset : offset + HEADER.size + len(body)] = HEADER.pack(cap_id, 1, following) + body
    return bytes(buffer)


def test_a_chain_is_walked_in_order() -> None:
    buffer = chain((32, 2, bytes(8)), (48, 1, bytes(8)), (64, 3, b""))
    assert list(capability_chain(buffer, 32)) == [(2, 32), (1, 48), (3, 64)]


@pytest.mark.parametrize(
    "buffer",
    [
        HEADER.pack(1, 1, 0)[:4].rjust(36, b"\0"),  # a header cut short by the buffer's end
        bytes(32) + HEADER.pack(1, 1, 32),  # a capability pointing at itself
        bytes(32) + HEADER.pack(1, 1, 4096),  # pointing outside the buffer
    ],
)
def test_malformed_chains_are_errors_not_loops_or_overreads(buffer: bytes) -> None:
    with pytest.raises(VfioError, match="malformed"):
        list(capability_chain(buffer, 32))


def test_sparse_mmap_areas_inside_the_region_only() -> None:
    areas = struct.pack("<QQQQQQ", 0, 0x1000, 0x3000, 0x1000, 0x8000, 0x10000)
    body = struct.pack("<II", 3, 0) + areas
    buffer = chain((32, int(uapi.VfioRegionInfoCap.SPARSE_MMAP), body))
    # the third area runs past the 0x10000-byte region and is dropped
    assert sparse_mmap_areas(buffer, 32, 0x10000) == ((0, 0x1000), (0x3000, 0x1000))
    lying = chain((32, int(uapi.VfioRegionInfoCap.SPARSE_MMAP), struct.pack("<II", 99, 0)))
    with pytest.raises(VfioError, match="malformed"):
        sparse_mmap_areas(lying, 32, 0x10000)
    cut_short = chain((32, int(uapi.VfioRegionInfoCap.SPARSE_MMAP), b"\1\0"))
    with pytest.raises(VfioError, match="malformed"):
        sparse_mmap_areas(cut_short, 32, 0x10000)


def test_header_layout_matches_the_struct() -> None:
    assert ctypes.sizeof(uapi.vfio_info_cap_header) == HEADER.size


class FakeRegionInfo:
    """Answers VFIO_DEVICE_GET_REGION_INFO as the kernel does: with the size it needs when the
    buffer is too small, else with the info and its capability chain."""

    def __init__(self, flags: int, size: int, caps: bytes, needed: int | None = None) -> None:
        self.flags, self.size, self.caps = flags, size, caps
        self.needed = needed if needed is not None else 32 + len(caps)
        self.calls = 0

    def __call__(self, fd: int, request: int, buffer: ctypes.Array) -> int:  # type: ignore[type-arg]
        assert request == uapi.VFIO_DEVICE_GET_REGION_INFO
        self.calls += 1
        info = uapi.vfio_region_info.from_buffer(buffer)
        if info.argsz < self.needed:
            info.argsz = self.needed
            return 0
        info.flags, info.size, info.offset = self.flags, self.size, 0x70000000000
        if self.caps:
            info.flags |= uapi.VfioRegionInfoFlag.CAPS
            info.cap_offset = 32
            ctypes.memmove(ctypes.addressof(buffer) + 32, self.caps, len(self.caps))
        return 0


def region_with(monkeypatch: pytest.MonkeyPatch, fake: FakeRegionInfo) -> Region:
    monkeypatch.setattr(device_module, "ioctl", fake)
    return VfioDevice(-1, "fake").region(0)


READ_WRITE_MMAP = (
    uapi.VfioRegionInfoFlag.READ | uapi.VfioRegionInfoFlag.WRITE | uapi.VfioRegionInfoFlag.MMAP
)


def test_region_info_is_asked_again_with_the_size_the_kernel_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = struct.pack("<II", 1, 0) + struct.pack("<QQ", 0x2000, 0x1000)
    caps = chain((0, int(uapi.VfioRegionInfoCap.SPARSE_MMAP), body))
    fake = FakeRegionInfo(READ_WRITE_MMAP, 0x10000, caps)
    region = region_with(monkeypatch, fake)
    assert fake.calls == 2
    assert region.mmap_areas == ((0x2000, 0x1000),)
    assert region.offset == 0x70000000000


def test_no_mmap_flag_means_nothing_may_be_mapped_whatever_the_caps_say(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = struct.pack("<II", 1, 0) + struct.pack("<QQ", 0, 0x1000)
    caps = chain((0, int(uapi.VfioRegionInfoCap.SPARSE_MMAP), body))
    flags = uapi.VfioRegionInfoFlag.READ
    assert region_with(monkeypatch, FakeRegionInfo(flags, 0x10000, caps)).mmap_areas == ()
    empty = chain((0, int(uapi.VfioRegionInfoCap.SPARSE_MMAP), struct.pack("<II", 0, 0)))
    fake = FakeRegionInfo(READ_WRITE_MMAP, 0x10000, empty)
    assert region_with(monkeypatch, fake).mmap_areas == ()  # a sparse cap with no areas
    whole = FakeRegionInfo(READ_WRITE_MMAP, 0x10000, b"")
    assert region_with(monkeypatch, whole).mmap_areas == ((0, 0x10000),)


def test_an_implausible_info_size_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRegionInfo(READ_WRITE_MMAP, 0x10000, b"", needed=1 << 30)
    with pytest.raises(VfioError, match="implausible"):
        region_with(monkeypatch, fake)
    assert fake.calls == 1
