"""virtio-iommu (virtio 1.2 §5.13): the guest's own IOMMU, in front of passed-through devices.

Two queues: requests (ATTACH, DETACH, MAP, UNMAP, PROBE, each a device-readable request and a
device-writable tail whose first byte is the status) and events (fault reports; buffers the
driver leaves there are kept for them). What a request does is iommu_domains.py's; this module
reads requests off the ring, answers them, and holds the configuration space.

Features offered: INPUT_RANGE, DOMAIN_RANGE, MAP_UNMAP, PROBE and BYPASS_CONFIG (not MMIO: a
mapping is of guest RAM). A request too short for its type, or with reserved bytes set, is
INVAL; an unknown type UNSUPP; a chain with no room for the tail is given back unanswered.

The endpoints are the PCI functions behind the IOMMU, named by their requester id (bus 0:
devfn), as the ACPI VIOT table (pyvmm.machine.acpi) tells the guest. Emulated devices are not
behind it: they read guest memory by guest-physical address in pyvmm itself, where a guest's
isolation would protect nothing and cost a translation per access.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from pyvmm.devices.virtio.backend import VirtioBackend
from pyvmm.devices.virtio.iommu_domains import GuestDomains, Refused, Status
from pyvmm.devices.virtio.pci import VirtioPciDevice
from pyvmm.devices.virtio.queue import DescriptorChain, Virtqueue

if TYPE_CHECKING:
    from pyvmm.machine.host import DeviceHost

log = logging.getLogger(__name__)

VIRTIO_ID_IOMMU = 23

VIRTIO_IOMMU_F_INPUT_RANGE = 1 << 0
VIRTIO_IOMMU_F_DOMAIN_RANGE = 1 << 1
VIRTIO_IOMMU_F_MAP_UNMAP = 1 << 2
VIRTIO_IOMMU_F_PROBE = 1 << 4
VIRTIO_IOMMU_F_BYPASS_CONFIG = 1 << 6

T_ATTACH = 1
T_DETACH = 2
T_MAP = 3
T_UNMAP = 4
T_PROBE = 5

QUEUE_SIZE = 256
PROBE_SIZE = 512  # bytes of properties a PROBE's writable part holds
TAIL_SIZE = 4  # struct virtio_iommu_req_tail: status, 3 reserved

# struct virtio_iommu_config: page_size_mask, input_range (u64 start, end), domain_range
# (u32 start, end), probe_size, bypass, 3 reserved
_CONFIG = struct.Struct("<QQQIIIB3x")
_BYPASS_OFFSET = 36

# The device-readable part of each request after its 4-byte head (type, 3 reserved), and
# which of its fields are reserved (must be zero).
_ATTACH = struct.Struct("<III4s")  # domain, endpoint, flags, reserved
_DETACH = struct.Struct("<II8s")  # domain, endpoint, reserved
_MAP = struct.Struct("<IQQQI")  # domain, virt_start, virt_end, phys_start, flags
_UNMAP = struct.Struct("<IQQ4s")  # domain, virt_start, virt_end, reserved
_PROBE = struct.Struct("<I64s")  # endpoint, reserved
_BODIES = {T_ATTACH: _ATTACH, T_DETACH: _DETACH, T_MAP: _MAP, T_UNMAP: _UNMAP, T_PROBE: _PROBE}
_LONGEST = 4 + max(body.size for body in _BODIES.values())


class VirtioIommu(VirtioBackend):
    device_type = VIRTIO_ID_IOMMU
    name = "virtio-iommu"
    class_code = 0x088000  # base system peripheral, "other" (as QEMU's)
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    features = (
        VIRTIO_IOMMU_F_INPUT_RANGE
        | VIRTIO_IOMMU_F_DOMAIN_RANGE
        | VIRTIO_IOMMU_F_MAP_UNMAP
        | VIRTIO_IOMMU_F_PROBE
        | VIRTIO_IOMMU_F_BYPASS_CONFIG
    )

    def __init__(self, domains: GuestDomains) -> None:
        super().__init__()
        self.domains = domains
        self.requests = 0  # answered, for pyvmm's own view
        self.refused = 0
        self._reset_failed = False

    def config(self) -> bytes:
        limits = self.domains.limits
        return _CONFIG.pack(
            ~(limits.page_size - 1) & ((1 << 64) - 1),
            *limits.input_range,
            *limits.domain_range,
            PROBE_SIZE,
            int(self.domains.bypass),
        )

    def config_write(self, offset: int, size: int, value: int) -> None:
        # Only `bypass` is the driver's to write (BYPASS_CONFIG is always offered; a driver may
        # write it before DRIVER_OK, when this backend has not yet been told the features).
        if offset == _BYPASS_OFFSET and not self.domains.set_bypass(bool(value & 0xFF)):
            self.needs_reset("the host IOMMU refused to move an endpoint to the new bypass")

    def process(self, index: int) -> None:
        if index != 0:
            return  # the event queue: its buffers wait for faults
        queue = self.queues[0]
        while (chain := queue.pop()) is not None:
            queue.push(chain, self._answer(chain))

    def activate(self, features: int, queues: list[Virtqueue]) -> None:
        super().activate(features, queues)
        if self._reset_failed:  # (told now: the reset itself clears the device's status)
            self.needs_reset("the host IOMMU refused to move an endpoint back at the last reset")

    def reset(self) -> None:
        super().reset()
        self._reset_failed = not self.domains.reset()

    def _answer(self, chain: DescriptorChain) -> int:
        """Carry out one request; the bytes written (0: no room for the status)."""
        writable = chain.writable_len
        if writable < TAIL_SIZE:
            log.warning("%s: a request with no room for its status: ignored", self.name)
            return 0
        properties = b""
        request = chain.read(0, min(chain.readable_len, _LONGEST))  # (a guest may offer GiBs)
        try:
            properties = self._carry_out(request, writable - TAIL_SIZE)
            status = Status.OK
        except Refused as refusal:
            status = refusal.status
            self.refused += 1
            log.debug("%s: %s: %s", self.name, status.name, refusal)
        self.requests += 1
        # The status is the first byte of the tail, the last 4 writable bytes; a PROBE's
        # properties come before it.
        if properties:
            chain.write(0, properties)
        chain.write(writable - TAIL_SIZE, bytes((status, 0, 0, 0)))
        return writable

    def _carry_out(self, request: bytes, room: int) -> bytes:
        """The request's effect on the domains; a PROBE's properties (else b"")."""
        if len(request) < 4:
            raise Refused(Status.INVAL, f"a request of {len(request)} bytes")
        kind = request[0]
        body = _BODIES.get(kind)
        if body is None:
            raise Refused(Status.UNSUPP, f"request type {kind}")
        if len(request) < 4 + body.size:
            raise Refused(Status.INVAL, f"type {kind} in {len(request)} bytes")
        fields = body.unpack_from(request, 4)
        if kind == T_ATTACH:
            domain, endpoint, flags, reserved = fields
            _zero(reserved)
            self.domains.attach(domain, endpoint, flags)
        elif kind == T_DETACH:
            domain, endpoint, reserved = fields
            _zero(reserved)
            self.domains.detach(domain, endpoint)
        elif kind == T_MAP:
            domain, start, end, gpa, flags = fields
            self.domains.map(domain, start, end, gpa, flags)
        elif kind == T_UNMAP:
            domain, start, end, reserved = fields
            _zero(reserved)
            self.domains.unmap(domain, start, end)
        else:
            endpoint, reserved = fields
            _zero(reserved)
            if room < PROBE_SIZE:
                raise Refused(Status.INVAL, f"PROBE with {room} bytes for its properties")
            return self.domains.probe(endpoint, PROBE_SIZE)
        return b""


def _zero(reserved: bytes) -> None:
    if any(reserved):
        raise Refused(Status.INVAL, "reserved bytes are not zero")


def create(machine: DeviceHost, domains: GuestDomains) -> VirtioPciDevice:
    """A virtio-iommu PCI function over `domains` (the board makes it for --viommu virtio)."""
    return VirtioPciDevice(machine, VirtioIommu(domains))
