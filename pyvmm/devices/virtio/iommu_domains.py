"""The guest's IOMMU domains as virtio-iommu defines them (virtio 1.2 §5.13.6): which endpoint
is attached to which domain, each domain's mappings, and what each request does to them.

`GuestDomains` decides and a `DomainBacking` carries the decision out in the host IOMMU
(pyvmm.vfio.iommufd.guest_domains: an IOAS and a HWPT per domain). Every request is checked in
full before the backing is asked for anything, so a request the guest gets an error status for
changes nothing, here or in the host; a backing that fails leaves the model where the host is
(DEVERR: nothing changed, or for an UNMAP, the mappings before the one that failed removed in
both). The guest is hostile: ids, ranges and flags are whatever it wrote, and it may ask for at
most MAX_MAPPINGS mappings in all (NOMEM beyond: each costs host memory and a kernel area).
The requests come from the device's worker thread, the bypass bit from a vCPU, pyvmm's view
from the control socket: one lock orders them.

Choices where the specification leaves them to the device, as QEMU's virtio-iommu makes them:
- a domain exists from its first ATTACH until its last endpoint leaves it (by DETACH, or by an
  ATTACH to another domain); its mappings go with it;
- an endpoint attached nowhere bypasses the IOMMU (identity: guest-physical addresses) while
  the `bypass` configuration bit is set, as it is at reset (QEMU's boot-bypass), and is blocked
  once the driver clears it (Linux leaves it set, and attaches every endpoint to a domain);
- a MAP's guest-physical range must lie in guest RAM (pyvmm maps RAM for device DMA, not other
  devices' BARs): RANGE otherwise.
"""

from __future__ import annotations

import bisect
import enum
import functools
import logging
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

from pyvmm.machine.state import StateError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    @functools.wraps(method)
    def run(self: GuestDomains, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


PAGE_SIZE = 4096
MAX_MAPPINGS = 1 << 18  # in all domains: Linux's DMA API under load keeps thousands at most
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)  # x86: writes here are MSIs, never DMA

ATTACH_F_BYPASS = 1
MAP_F_READ = 1
MAP_F_WRITE = 2
MAP_F_MMIO = 4

# PROBE properties (§5.13.6.8)
PROBE_T_NONE = 0
PROBE_T_RESV_MEM = 1
RESV_MEM_T_RESERVED = 0
RESV_MEM_T_MSI = 1
_RESV_MEM = struct.Struct("<HHB3xQQ")  # type, length, subtype, reserved, start, end


class Status(enum.IntEnum):
    """A request's status (§5.13.6.1)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2
    DEVERR = 3
    INVAL = 4
    RANGE = 5
    NOENT = 6
    FAULT = 7
    NOMEM = 8


class Refused(Exception):
    """A request the device answers with `status` and no change."""

    def __init__(self, status: Status, why: str) -> None:
        super().__init__(why)
        self.status = status


class BackingError(Exception):
    """The host IOMMU refused what the backing was asked (the guest gets DEVERR)."""


class DomainBacking(Protocol):
    """What the model's decisions do to the host IOMMU. Each call either happens in full or
    raises BackingError having changed nothing."""

    def create(self, domain: int) -> None:
        """A new (translating) domain: empty."""

    def destroy(self, domain: int) -> None:
        """A domain with no endpoint left goes, with its mappings."""

    def attach(self, endpoint: int, domain: int | None) -> None:
        """`endpoint` translates through `domain` from now on; None: guest-physical addresses
        as they are (identity: a bypass domain, or no domain with bypass on)."""

    def block(self, endpoint: int) -> None:
        """`endpoint` reaches nothing (no domain, bypass off)."""

    def map(self, domain: int, iova: int, gpa: int, size: int, writable: bool) -> None:
        """Guest RAM at `gpa` appears at `iova` in `domain`."""

    def unmap(self, domain: int, iova: int, size: int) -> None:
        """The mapping at exactly [iova, iova + size) in `domain` goes, before this returns."""


@dataclass(frozen=True)
class Mapping:
    start: int  # IOVA, inclusive
    end: int  # IOVA, inclusive
    gpa: int
    flags: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1


@dataclass
class Domain:
    bypass: bool
    endpoints: set[int] = field(default_factory=set)
    starts: list[int] = field(default_factory=list)  # the mappings' starts, sorted
    mappings: dict[int, Mapping] = field(default_factory=dict)  # by start

    def overlapping(self, start: int, end: int) -> list[Mapping]:
        """The mappings that share an IOVA with [start, end], in order."""
        index = bisect.bisect_right(self.starts, end)
        found = []
        while index > 0:
            index -= 1
            mapping = self.mappings[self.starts[index]]
            if mapping.end < start:
                break
            found.append(mapping)
        return found[::-1]

    def mapped(self) -> list[Mapping]:
        """Its mappings, by IOVA."""
        return [self.mappings[start] for start in self.starts]

    def add(self, mapping: Mapping) -> None:
        bisect.insort(self.starts, mapping.start)
        self.mappings[mapping.start] = mapping

    def remove(self, mapping: Mapping) -> None:
        self.starts.pop(bisect.bisect_left(self.starts, mapping.start))
        del self.mappings[mapping.start]


@dataclass
class SavedMapping:
    start: int
    end: int
    gpa: int
    flags: int


@dataclass
class SavedDomain:
    id: int
    bypass: bool
    endpoints: list[int]
    mappings: list[SavedMapping]


@dataclass
class GuestDomainsState:
    """The guest's domains, their endpoints and mappings, and the bypass bit."""

    VERSION: ClassVar[int] = 1
    bypass: bool
    domains: list[SavedDomain]


@dataclass(frozen=True)
class Limits:
    """What the device's configuration space promises the driver."""

    input_range: tuple[int, int] = (0, (1 << 48) - 1)  # IOVAs a mapping may use, inclusive
    domain_range: tuple[int, int] = (1, 0xFFFF)  # domain ids, inclusive
    page_size: int = PAGE_SIZE  # the smallest granule; every size a multiple of it


class GuestDomains:
    """The model. `endpoints` are the endpoint ids behind the IOMMU (a PCI function's
    requester id); `in_ram(gpa, size)` says whether a guest-physical range is guest RAM;
    `reserved(endpoint)` gives the IOVA ranges the host cannot map for it (inclusive)."""

    def __init__(
        self,
        backing: DomainBacking,
        endpoints: Iterable[int],
        in_ram: Callable[[int, int], bool],
        *,
        limits: Limits = Limits(),
        reserved: Callable[[int], list[tuple[int, int]]] = lambda endpoint: [],
    ) -> None:
        self.backing = backing
        self.endpoints = set(endpoints)  # (added to before the guest runs)
        self.in_ram = in_ram
        self.limits = limits
        self.reserved = reserved
        self.domains: dict[int, Domain] = {}
        self.attached: dict[int, int] = {}  # endpoint -> domain
        self.bypass = True
        # domains made, mappings made and removed, for pyvmm's own view
        self.created = self.maps = self.unmaps = 0
        self.mappings = 0  # now, in all domains
        self._lock = threading.RLock()

    # requests (§5.13.6.3-6)

    @_locked
    def attach(self, domain_id: int, endpoint: int, flags: int) -> None:
        bypass = bool(flags & ATTACH_F_BYPASS)
        if flags & ~ATTACH_F_BYPASS:
            raise Refused(Status.INVAL, f"ATTACH flags {flags:#x} has unknown bits")
        self._check_endpoint(endpoint)
        low, high = self.limits.domain_range
        if not low <= domain_id <= high:
            raise Refused(Status.RANGE, f"domain {domain_id} is outside {low}-{high}")
        domain = self.domains.get(domain_id)
        if domain is not None and domain.bypass != bypass:
            raise Refused(Status.INVAL, f"domain {domain_id} is {self._kind(domain)}")
        previous = self.attached.get(endpoint)
        if previous == domain_id:
            return
        created = domain is None
        if created:
            domain = Domain(bypass)
            if not bypass:
                self._backing(self.backing.create, domain_id)
        try:
            self._backing(self.backing.attach, endpoint, None if bypass else domain_id)
        except Refused:
            if created and not bypass:
                self._quietly(self.backing.destroy, domain_id)
            raise
        if created:
            self.domains[domain_id] = domain
            self.created += 1
        domain.endpoints.add(endpoint)
        self.attached[endpoint] = domain_id
        if previous is not None:
            self._leave(previous, endpoint)

    @_locked
    def detach(self, domain_id: int, endpoint: int) -> None:
        self._check_endpoint(endpoint)
        if self.attached.get(endpoint) != domain_id:
            raise Refused(Status.INVAL, f"endpoint {endpoint:#x} is not in domain {domain_id}")
        self._set_unattached(endpoint)
        del self.attached[endpoint]
        self._leave(domain_id, endpoint)

    @_locked
    def map(self, domain_id: int, start: int, end: int, gpa: int, flags: int) -> None:
        domain = self._domain(domain_id)
        if flags & ~(MAP_F_READ | MAP_F_WRITE) or not flags & (MAP_F_READ | MAP_F_WRITE):
            # (MMIO: the F_MMIO feature is not offered)
            raise Refused(Status.INVAL, f"MAP flags {flags:#x}")
        if domain.bypass:
            raise Refused(Status.INVAL, f"domain {domain_id} is a bypass domain")
        self._check_range(start, end)
        size = end - start + 1
        if gpa % self.limits.page_size:
            raise Refused(Status.RANGE, f"guest address {gpa:#x} is not page aligned")
        if gpa + size > 1 << 64 or not self.in_ram(gpa, size):
            raise Refused(Status.RANGE, f"{gpa:#x}+{size:#x} is not guest RAM")
        if domain.overlapping(start, end):
            raise Refused(Status.INVAL, f"{start:#x}-{end:#x} is already mapped")
        if self.mappings >= MAX_MAPPINGS:
            raise Refused(Status.NOMEM, f"{self.mappings} mappings already")
        self._backing(self.backing.map, domain_id, start, gpa, size, bool(flags & MAP_F_WRITE))
        domain.add(Mapping(start, end, gpa, flags))
        self.maps += 1
        self.mappings += 1

    @_locked
    def unmap(self, domain_id: int, start: int, end: int) -> None:
        domain = self._domain(domain_id)
        if end < start:
            raise Refused(Status.RANGE, f"{start:#x}-{end:#x} is empty")
        affected = domain.overlapping(start, end)
        split = [m for m in affected if m.start < start or m.end > end]
        if split:
            raise Refused(Status.RANGE, f"{start:#x}-{end:#x} would split a mapping")
        for mapping in affected:
            # (one at a time: each is gone from the host before the model forgets it)
            self._backing(self.backing.unmap, domain_id, mapping.start, mapping.size)
            domain.remove(mapping)
            self.unmaps += 1
            self.mappings -= 1

    @_locked
    def probe(self, endpoint: int, room: int) -> bytes:
        """The endpoint's properties, in `room` bytes: the MSI window and the host's
        reserved ranges, then zeros (the NONE property that ends them)."""
        self._check_endpoint(endpoint)
        regions = [(RESV_MEM_T_MSI, *MSI_WINDOW)]
        try:
            reserved = self.reserved(endpoint)
        except BackingError as err:
            raise Refused(Status.DEVERR, f"the host IOMMU's ranges are unknown: {err}") from None
        regions += [(RESV_MEM_T_RESERVED, s, e) for s, e in reserved]
        body = b"".join(
            _RESV_MEM.pack(PROBE_T_RESV_MEM, _RESV_MEM.size - 4, subtype, start, end)
            for subtype, start, end in regions
        )
        if len(body) > room:
            raise Refused(Status.INVAL, f"{len(regions)} properties do not fit {room} bytes")
        return body.ljust(room, b"\0")

    # the configuration's bypass bit, and reset

    @_locked
    def set_bypass(self, enabled: bool) -> bool:
        """The driver wrote the configuration's `bypass`: endpoints attached nowhere follow.
        False if the host refused to move one: its DMA is not what the driver now expects
        (the device must tell the driver to reset it)."""
        if enabled == self.bypass:
            return True
        self.bypass = enabled
        moved = [
            self._quietly(self._set_unattached, endpoint)
            for endpoint in sorted(self.endpoints - self.attached.keys())
        ]
        return all(moved)

    @_locked
    def reset(self) -> bool:
        """The device reset: every domain gone, every endpoint attached nowhere, bypass on.
        False if the host refused to move an endpoint back (its DMA still goes through a
        domain the driver no longer knows)."""
        self.bypass = True
        moved = [self._quietly(self.backing.attach, endpoint, None) for endpoint in self.endpoints]
        for domain_id, domain in sorted(self.domains.items()):
            if not domain.bypass:
                self._quietly(self.backing.destroy, domain_id)
        self.domains.clear()
        self.mappings = 0
        self.attached.clear()
        return all(moved)

    # state (a component of the machine: "viommu")

    state_type: ClassVar[type] = GuestDomainsState

    @_locked
    def save(self) -> GuestDomainsState:
        return GuestDomainsState(
            self.bypass,
            [
                SavedDomain(
                    domain_id,
                    domain.bypass,
                    sorted(domain.endpoints),
                    [SavedMapping(m.start, m.end, m.gpa, m.flags) for m in domain.mapped()],
                )
                for domain_id, domain in sorted(self.domains.items())
            ],
        )

    @_locked
    def restore(self, state: GuestDomainsState) -> None:
        """Make the saved domains again, by the requests that made them (so a state no guest
        could have made is refused as such a request would be), into a reset model."""
        self.reset()
        try:
            for saved in state.domains:
                if not saved.endpoints:
                    raise Refused(Status.INVAL, f"domain {saved.id} has no endpoint")
                for endpoint in saved.endpoints:
                    if endpoint in self.attached:
                        raise Refused(Status.INVAL, f"endpoint {endpoint:#x} is in two domains")
                    self.attach(saved.id, endpoint, ATTACH_F_BYPASS if saved.bypass else 0)
                for m in saved.mappings:
                    self.map(saved.id, m.start, m.end, m.gpa, m.flags)
            self.set_bypass(state.bypass)
        except Refused as err:
            self.reset()
            raise StateError(f"the saved virtio-iommu domains do not fit: {err}") from None

    # what the rest of pyvmm asks

    @_locked
    def describe(self) -> dict[str, object]:
        """The domains as pyvmm's users see them (the control socket, --exit-stats)."""
        return {
            "bypass": self.bypass,
            "created": self.created,
            "maps": self.maps,
            "unmaps": self.unmaps,
            "domains": [
                {
                    "id": domain_id,
                    "bypass": domain.bypass,
                    "endpoints": sorted(domain.endpoints),
                    "mappings": len(domain.mappings),
                    "mapped_bytes": sum(m.size for m in domain.mappings.values()),
                }
                for domain_id, domain in sorted(self.domains.items())
            ],
        }

    @_locked
    def translate(self, endpoint: int, iova: int) -> int | None:
        """The guest-physical address `endpoint` reaches at `iova`, or None (blocked)."""
        domain_id = self.attached.get(endpoint)
        if domain_id is None:
            return iova if self.bypass else None
        domain = self.domains[domain_id]
        if domain.bypass:
            return iova
        found = domain.overlapping(iova, iova)
        return found[0].gpa + iova - found[0].start if found else None

    # helpers

    def _check_endpoint(self, endpoint: int) -> None:
        if endpoint not in self.endpoints:
            raise Refused(Status.NOENT, f"no endpoint {endpoint:#x} behind this IOMMU")

    def _check_range(self, start: int, end: int) -> None:
        granule = self.limits.page_size
        low, high = self.limits.input_range
        if end < start or start % granule or (end + 1) % granule:
            raise Refused(Status.RANGE, f"{start:#x}-{end:#x} is not whole pages")
        if start < low or end > high:
            raise Refused(Status.RANGE, f"{start:#x}-{end:#x} is outside {low:#x}-{high:#x}")

    def _domain(self, domain_id: int) -> Domain:
        domain = self.domains.get(domain_id)
        if domain is None:
            raise Refused(Status.NOENT, f"no domain {domain_id}")
        return domain

    def _set_unattached(self, endpoint: int) -> None:
        if self.bypass:
            self._backing(self.backing.attach, endpoint, None)
        else:
            self._backing(self.backing.block, endpoint)

    def _leave(self, domain_id: int, endpoint: int) -> None:
        """`endpoint` is no longer in `domain_id` (already moved in the host): the domain goes
        with its last endpoint."""
        domain = self.domains[domain_id]
        domain.endpoints.discard(endpoint)
        if not domain.endpoints:
            del self.domains[domain_id]
            self.mappings -= len(domain.mappings)
            if not domain.bypass:
                self._quietly(self.backing.destroy, domain_id)

    @staticmethod
    def _kind(domain: Domain) -> str:
        return "a bypass domain" if domain.bypass else "a translating domain"

    @staticmethod
    def _backing(call: Callable[..., None], *args: object) -> None:
        try:
            call(*args)
        except BackingError as err:
            raise Refused(Status.DEVERR, f"the host IOMMU refused it: {err}") from None

    @staticmethod
    def _quietly(call: Callable[..., None], *args: object) -> bool:
        """A step no request status answers: False after a failure, which is logged and
        leaves host state behind that the backing owns and releases when it closes."""
        try:
            call(*args)
        except (BackingError, Refused) as err:
            log.warning("virtio-iommu: %s", err)
            return False
        return True
