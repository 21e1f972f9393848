"""VFIO info capability chains as the kernel lays them out, and malformed ones (no kernel needed:
the chains are parsed from bytes; the lab tests read real ones)."""

from __future__ import annotations

import ctypes
import struct

import pytest

from pyvmm.uapi import vfio as uapi
from pyvmm.vfio.device import capability_chain, sparse_mmap_areas
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
