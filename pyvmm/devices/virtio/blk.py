"""virtio-blk (virtio 1.2 §5.2) on a raw image file: read, write, flush, get-id.

A request is a 16-byte header (type, reserved, sector) in device-readable buffers, data (read:
writable, write: readable), and a one-byte status at the very end of the writable buffers. Data
moves between the file and guest memory with preadv/pwritev straight into views from the DMA view.
Whatever the guest sends, the answer is a status: a request outside the disk, of a length that is
not whole sectors, or a write to a read-only disk gets VIRTIO_BLK_S_IOERR, an unknown type
VIRTIO_BLK_S_UNSUPP; a chain too short to hold a header and a status byte is returned unused.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import TYPE_CHECKING, Any

from pyvmm.devices.virtio.backend import VIRTIO_ID_BLOCK, VirtioBackend
from pyvmm.devices.virtio.pci import VirtioPciDevice
from pyvmm.devices.virtio.queue import DescriptorChain
from pyvmm.errors import ConfigError

if TYPE_CHECKING:
    from pyvmm.machine.host import DeviceHost

log = logging.getLogger(__name__)

VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512
ID_BYTES = 20
QUEUE_SIZE = 256
IOV_MAX = 1024  # preadv/pwritev take at most this many buffers per call

_HEADER = struct.Struct("<IIQ")
# struct virtio_blk_config up to blk_size: capacity, size_max, seg_max, geometry, blk_size.
_CONFIG = struct.Struct("<QIIHBBI")


class VirtioBlk(VirtioBackend):
    """A disk backed by the raw image at `path` (its size, rounded down to whole sectors)."""

    device_type = VIRTIO_ID_BLOCK
    name = "virtio-blk"
    class_code = 0x010000  # mass storage
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, path: str, *, read_only: bool = False, serial: str | None = None) -> None:
        super().__init__()
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags)
        except OSError as err:
            raise ConfigError(
                f"virtio-blk: cannot open disk image {path}: {err.strerror}"
            ) from None
        size = os.fstat(self._fd).st_size
        if size % SECTOR_SIZE:
            log.warning("%s: %d bytes past the last whole sector are not visible", path, size)
        self.path = path
        self.read_only = read_only
        self.capacity = size // SECTOR_SIZE
        self.features = (
            VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | (VIRTIO_BLK_F_RO if read_only else 0)
        )
        name = serial if serial is not None else os.path.basename(path)
        self.device_id = name.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")

    def chosen_options(self) -> dict[str, Any]:
        # the image by its absolute path: a restore or a migration's destination may run
        # in another directory
        return {"path": os.path.abspath(self.path)}

    def config(self) -> bytes:
        # seg_max: data buffers per request, leaving room for the header and status descriptors
        return _CONFIG.pack(self.capacity, 0, QUEUE_SIZE - 2, 0, 0, 0, SECTOR_SIZE)

    def process(self, index: int) -> None:
        queue = self.queues[index]
        while (chain := queue.pop()) is not None:
            queue.push(chain, self._request(chain))

    def _request(self, chain: DescriptorChain) -> int:
        """Carry out one request; returns the bytes written into the chain (data + status)."""
        status_at = chain.writable_len - 1
        if chain.readable_len < _HEADER.size or status_at < 0:
            log.debug("request %d: no room for header and status; returned unused", chain.head)
            return 0
        kind, _, sector = _HEADER.unpack(chain.read(0, _HEADER.size))
        written = 0
        if kind == VIRTIO_BLK_T_IN:
            status = self._transfer(chain, sector, status_at, write=False)
            written = status_at if status == VIRTIO_BLK_S_OK else 0
        elif kind == VIRTIO_BLK_T_OUT:
            length = chain.readable_len - _HEADER.size
            status = (
                VIRTIO_BLK_S_IOERR
                if self.read_only
                else self._transfer(chain, sector, length, write=True)
            )
        elif kind == VIRTIO_BLK_T_FLUSH:
            status = self._flush()
        elif kind == VIRTIO_BLK_T_GET_ID:
            written = chain.write(0, self.device_id[:status_at])
            status = VIRTIO_BLK_S_OK
        else:
            status = VIRTIO_BLK_S_UNSUPP
        chain.write(status_at, bytes([status]))
        return written + 1

    def _transfer(self, chain: DescriptorChain, sector: int, length: int, *, write: bool) -> int:
        if length % SECTOR_SIZE or sector + length // SECTOR_SIZE > self.capacity:
            log.debug(
                "%s of %d bytes at sector %d: not whole sectors inside the disk",
                "write" if write else "read",
                length,
                sector,
            )
            return VIRTIO_BLK_S_IOERR
        if write:
            views = chain.readable_views(_HEADER.size, length)
        else:
            views = chain.writable_views(0, length)
        views = [view for view in views if len(view)]
        offset = sector * SECTOR_SIZE
        try:
            for start in range(0, len(views), IOV_MAX):
                offset = self._io(views[start : start + IOV_MAX], offset, write)
        except OSError as err:
            log.warning(
                "%s: %s at byte %d failed: %s", self.path, "write" if write else "read", offset, err
            )
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _io(self, views: list[memoryview], offset: int, write: bool) -> int:
        """preadv/pwritev until every view is done (they may stop short); returns the file
        offset after them."""
        while views:
            done = (
                os.pwritev(self._fd, views, offset) if write else os.preadv(self._fd, views, offset)
            )
            if done == 0:
                raise OSError(f"unexpected end of file at byte {offset}")
            offset += done
            while views and done >= len(views[0]):
                done -= len(views[0])
                views = views[1:]
            if views and done:
                views = [views[0][done:], *views[1:]]
        return offset

    def _flush(self) -> int:
        if self.read_only:
            return VIRTIO_BLK_S_OK
        try:
            os.fdatasync(self._fd)
        except OSError as err:
            log.warning("%s: flush failed: %s", self.path, err)
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def create(
    machine: DeviceHost, path: str, read_only: bool = False, serial: str | None = None
) -> VirtioPciDevice:
    """A virtio-blk PCI function on the raw image `path` (device kind "virtio-blk")."""
    return VirtioPciDevice(machine, VirtioBlk(path, read_only=read_only, serial=serial))
