"""virtio-net (virtio 1.2 §5.1) on a host tap interface: one receive and one transmit queue.

No offloads are offered, so every frame is a plain Ethernet frame behind a 12-byte
virtio_net_hdr (the VERSION_1 layout, with num_buffers). Transmit strips the header and writes
the frame to the tap; receive reads a frame from the tap and puts header and frame into the
next receive chain. The worker waits on the tap only while the guest has receive buffers posted,
so a full receive queue leaves frames in the tap's queue instead of spinning.

The tap is opened multi-queue, so that a migration's destination on the same host can open it
while the source still has it. Each machine's queue is attached (TUNSETQUEUE) only while its
driver has the device up and the machine runs, so the kernel hands no frame to a queue no one
will read: a destination waiting for its state, a source paused for its last round. A paused
machine's frames go to another queue of the tap, or are dropped as a full queue's would be (a
detach drops what the queue held); a tap made without multi-queue keeps them queued instead.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from typing import TYPE_CHECKING, Any

from pyvmm.devices.virtio.backend import VIRTIO_ID_NET, VirtioBackend
from pyvmm.devices.virtio.pci import VirtioPciDevice
from pyvmm.devices.virtio.queue import Virtqueue
from pyvmm.errors import ConfigError

if TYPE_CHECKING:
    from pyvmm.machine.host import DeviceHost

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETQUEUE = 0x400454D9  # _IOW('T', 217, int)
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFNAMSIZ = 16

VIRTIO_NET_F_MAC = 1 << 5
NET_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_*, num_buffers
RX_HEADER = NET_HDR.pack(0, 0, 0, 0, 0, 0, 1)  # no offloads; one buffer per frame
RX, TX = 0, 1
QUEUE_SIZE = 256
MAX_FRAME = 65535
RX_BATCH = 64  # frames per wake-up, so transmit is not starved by a flood


def open_tap(name: str) -> tuple[int, bool]:
    """A non-blocking fd on the tap interface `name` (created if absent and allowed), and
    whether it is a queue of a multi-queue tap (which can be detached and attached)."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise ConfigError(f"virtio-net: tap name {name!r} must be 1 to {IFNAMSIZ - 1} bytes")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ConfigError(
            f"virtio-net: cannot open {TUN_DEVICE}: {err.strerror} (load the tun module?)"
        ) from None
    try:
        try:
            # Multi-queue, so that a second machine can attach while this one has it: a
            # migration's destination on the same host opens the tap before the source ends.
            flags = IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
            multi_queue = True
        except OSError as err:
            if err.errno != errno.EINVAL:  # a tap made without multi-queue takes one opener
                raise
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
            multi_queue = False
    except OSError as err:
        os.close(fd)
        raise ConfigError(
            f"virtio-net: cannot attach to tap {name}: {err.strerror} (needs CAP_NET_ADMIN, or "
            f"a tap made for this user: ip tuntap add {name} mode tap user $USER)"
        ) from None
    return fd, multi_queue


def set_queue_attached(fd: int, attached: bool) -> None:
    """Attach a multi-queue tap's queue `fd` (frames are handed to it) or detach it."""
    flags = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
    fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH22x", b"", flags))


class VirtioNet(VirtioBackend):
    """A NIC on tap `tap` with MAC address `mac` (default: random, locally administered)."""

    device_type = VIRTIO_ID_NET
    name = "virtio-net"
    class_code = 0x020000  # Ethernet controller
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    features = VIRTIO_NET_F_MAC

    def chosen_options(self) -> dict[str, Any]:
        return {"mac": ":".join(f"{b:02x}" for b in self.mac)}

    def __init__(self, tap: str, mac: bytes | None = None) -> None:
        super().__init__()
        if mac is not None and len(mac) != 6:
            raise ConfigError(f"virtio-net: a MAC address has 6 bytes, not {len(mac)}")
        self.mac = mac if mac is not None else bytes([0x52, 0x54, 0x00]) + os.urandom(3)
        self.tap_name = tap
        self._tap, self._multi_queue = open_tap(tap)
        self._up = False  # the driver activated the device
        self._paused = False
        self._attached = True  # (TUNSETIFF attaches the queue)
        self._follow()

    def config(self) -> bytes:
        return self.mac

    def process(self, index: int) -> None:
        if index == TX:
            self._transmit()
        else:
            self._receive()

    def input_fds(self) -> dict[int, int]:
        if self._tap >= 0 and self.queues and self.queues[RX].has_available():
            return {self._tap: RX}
        return {}

    def input_ready(self, fd: int) -> None:
        self._receive()

    def _transmit(self) -> None:
        tx = self.queues[TX]
        while (chain := tx.pop()) is not None:
            length = chain.readable_len - NET_HDR.size
            if 0 < length <= MAX_FRAME:
                try:
                    os.write(self._tap, chain.read(NET_HDR.size, length))
                except OSError as err:  # the tap is down or full: the frame is lost
                    log.debug("%s: frame dropped: %s", self.tap_name, err)
            tx.push(chain, 0)

    def _receive(self) -> None:
        rx = self.queues[RX]
        for _ in range(RX_BATCH):
            if not rx.has_available():
                return
            try:
                frame = os.read(self._tap, MAX_FRAME)
            except BlockingIOError:
                return
            except OSError as err:
                log.warning("%s: read failed: %s", self.tap_name, err)
                return
            chain = rx.pop()
            if chain is None:
                return
            if chain.writable_len < NET_HDR.size + len(frame):
                log.debug("%s: %d-byte frame does not fit; dropped", self.tap_name, len(frame))
                rx.push(chain, 0)
                continue
            chain.write(0, RX_HEADER)
            chain.write(NET_HDR.size, frame)
            rx.push(chain, NET_HDR.size + len(frame))

    def activate(self, features: int, queues: list[Virtqueue]) -> None:
        super().activate(features, queues)
        self._up = True
        self._follow()

    def reset(self) -> None:
        super().reset()
        self._up = False
        self._follow()

    def pause(self) -> None:
        self._paused = True
        self._follow()

    def resume(self) -> None:
        self._paused = False
        self._follow()

    def _follow(self) -> None:
        """Attach the tap queue while the device is up and the machine runs, else detach it."""
        wanted = self._up and not self._paused
        if self._tap < 0 or not self._multi_queue or wanted == self._attached:
            return  # (a single-queue tap cannot be detached)
        try:
            set_queue_attached(self._tap, wanted)
        except OSError as err:
            log.warning("%s: cannot %s its queue: %s", self.tap_name,
                        "attach" if wanted else "detach", err.strerror)  # fmt: skip
            return
        self._attached = wanted

    def close(self) -> None:
        if self._tap >= 0:
            os.close(self._tap)
            self._tap = -1


def create(machine: DeviceHost, tap: str, mac: str | None = None) -> VirtioPciDevice:
    """A virtio-net PCI function on tap `tap`, with MAC address `mac` ("52:54:00:12:34:56"; by
    default a random one) (device kind "virtio-net")."""
    return VirtioPciDevice(machine, VirtioNet(tap, parse_mac(mac) if mac else None))


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ConfigError(
            f"virtio-net: bad MAC address {text!r}: use six hex bytes, e.g. 52:54:00:12:34:56"
        )
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"virtio-net: bad MAC address {text!r}: use six hex bytes") from None
