"""virtio-iommu: the domain model's answers to every request (virtio 1.2 §5.13.6), checked against
a host IOMMU of our own that records what it was asked; hostile request sequences from
hypothesis; and the device over the virtio-pci transport, its requests written into its ring
the way Linux's driver writes them."""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pcibench import virtio_device

from pyvmm.devices.pci.device import PCI_COMMAND, PCI_COMMAND_MASTER
from pyvmm.devices.virtio import iommu_domains
from pyvmm.devices.virtio.backend import VIRTIO_F_VERSION_1
from pyvmm.devices.virtio.iommu import (
    PROBE_SIZE,
    VIRTIO_IOMMU_F_BYPASS_CONFIG,
    VIRTIO_IOMMU_F_PROBE,
    VirtioIommu,
)
from pyvmm.devices.virtio.iommu_domains import (
    ATTACH_F_BYPASS,
    MAP_F_READ,
    MAP_F_WRITE,
    BackingError,
    GuestDomains,
    GuestDomainsState,
    Refused,
    Status,
)
from pyvmm.devices.virtio.pci import ISR_CONFIG
from pyvmm.devices.virtio.pci_common import STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK
from pyvmm.devices.virtio.pci_layout import DEVICE_OFFSET
from pyvmm.machine import acpi
from pyvmm.machine.state import StateError, from_plain, to_plain

RAM = (0, 64 << 20)  # guest RAM: [0, 64 MiB)
EP_A, EP_B, EP_C = 0x08, 0x10, 0x18  # 00:01.0, 00:02.0, 00:03.0
PAGE = 4096


class FakeHostIommu:
    """The host side as a backing sees it: each endpoint's page table ("identity", "blocked"
    or a domain), each domain's mappings; `fail` makes the next call refuse."""

    def __init__(self, endpoints: tuple[int, ...]) -> None:
        self.placement: dict[int, object] = dict.fromkeys(endpoints, "identity")
        self.tables: dict[int, dict[int, tuple[int, int, bool]]] = {}
        self.fail = False  # the next call refuses
        self.fail_at: int | None = None  # the call with this index refuses
        self.calls: list[str] = []

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.fail or self.fail_at == len(self.calls) - 1:
            self.fail = False
            raise BackingError(f"{what}: Invalid argument")

    def create(self, domain: int) -> None:
        self._call("create")
        assert domain not in self.tables
        self.tables[domain] = {}

    def destroy(self, domain: int) -> None:
        self._call("destroy")
        assert domain not in self.placement.values(), "destroyed while in use"
        del self.tables[domain]

    def attach(self, endpoint: int, domain: int | None) -> None:
        self._call("attach")
        assert domain is None or domain in self.tables
        self.placement[endpoint] = "identity" if domain is None else domain

    def block(self, endpoint: int) -> None:
        self._call("block")
        self.placement[endpoint] = "blocked"

    def map(self, domain: int, iova: int, gpa: int, size: int, writable: bool) -> None:
        self._call("map")
        table = self.tables[domain]
        assert all(iova + size <= s or s + n <= iova for s, (_, n, _) in table.items())
        assert RAM[0] <= gpa and gpa + size <= RAM[1], "a mapping outside guest RAM"
        table[iova] = (gpa, size, writable)

    def unmap(self, domain: int, iova: int, size: int) -> None:
        self._call("unmap")
        assert self.tables[domain].pop(iova)[1] == size


def in_ram(gpa: int, size: int) -> bool:
    return RAM[0] <= gpa and gpa + size <= RAM[1]


def model(*endpoints: int) -> tuple[GuestDomains, FakeHostIommu]:
    endpoints = endpoints or (EP_A, EP_B)
    host = FakeHostIommu(endpoints)
    return GuestDomains(host, endpoints, in_ram), host


def agrees(domains: GuestDomains, host: FakeHostIommu) -> None:
    """What the model says is what the host IOMMU has."""
    for endpoint in domains.endpoints:
        domain_id = domains.attached.get(endpoint)
        if domain_id is None:
            wanted: object = "identity" if domains.bypass else "blocked"
        else:
            wanted = "identity" if domains.domains[domain_id].bypass else domain_id
        assert host.placement[endpoint] == wanted, endpoint
    assert domains.mappings == sum(len(d.mappings) for d in domains.domains.values())
    translating = {d: dom for d, dom in domains.domains.items() if not dom.bypass}
    # A domain whose destroy the host refused may be left there, unreachable: no endpoint in it
    orphans = set(host.tables) - set(translating)
    assert set(translating) <= set(host.tables)
    assert not orphans & set(host.placement.values()), orphans
    for domain_id, domain in translating.items():
        mappings = domain.mappings.values()
        mapped = {m.start: (m.gpa, m.size, bool(m.flags & MAP_F_WRITE)) for m in mappings}
        assert mapped == host.tables[domain_id]
        assert domain.endpoints and sorted(domain.starts) == domain.starts
        assert all(domains.attached[e] == domain_id for e in domain.endpoints)


def refused(status: Status, call: object, *args: int) -> None:
    with pytest.raises(Refused) as err:
        call(*args)  # type: ignore[operator]
    assert err.value.status is status, str(err.value)


def test_attach_map_translate_unmap_detach() -> None:
    domains, host = model()
    domains.attach(1, EP_A, 0)
    domains.map(1, 0x10000, 0x1FFFF, 0x200000, MAP_F_READ | MAP_F_WRITE)
    assert domains.translate(EP_A, 0x10123) == 0x200123
    assert domains.translate(EP_A, 0x20000) is None
    assert domains.translate(EP_B, 0x10123) == 0x10123  # attached nowhere, bypass on
    assert host.tables == {1: {0x10000: (0x200000, 0x10000, True)}}
    agrees(domains, host)
    assert domains.describe() == {
        "bypass": True,
        "created": 1,
        "maps": 1,
        "unmaps": 0,
        "domains": [
            {"id": 1, "bypass": False, "endpoints": [EP_A], "mappings": 1, "mapped_bytes": 0x10000}
        ],
    }
    domains.unmap(1, 0, (1 << 48) - 1)
    assert (domains.maps, domains.unmaps) == (1, 1)
    assert host.tables == {1: {}}
    domains.detach(1, EP_A)
    assert host.tables == {} and host.placement[EP_A] == "identity"
    agrees(domains, host)


def test_a_domain_goes_with_its_last_endpoint_and_an_attach_elsewhere_moves_an_endpoint() -> None:
    domains, host = model()
    domains.attach(1, EP_A, 0)
    domains.attach(1, EP_B, 0)
    domains.map(1, 0, PAGE - 1, 0, MAP_F_READ)
    domains.attach(2, EP_A, 0)  # A leaves 1 (B stays), no DETACH needed
    assert host.placement == {EP_A: 2, EP_B: 1} and set(host.tables) == {1, 2}
    domains.attach(2, EP_B, 0)  # 1 is left empty: it goes, its mapping with it
    assert set(host.tables) == {2} and 1 not in domains.domains
    agrees(domains, host)
    domains.attach(1, EP_A, 0)  # a reused id starts empty
    assert host.tables[1] == {}


def test_bypass_domains_and_the_bypass_bit() -> None:
    domains, host = model()
    domains.attach(5, EP_A, ATTACH_F_BYPASS)
    assert host.placement[EP_A] == "identity" and host.tables == {}
    refused(Status.INVAL, domains.map, 5, 0, PAGE - 1, 0, MAP_F_READ)
    refused(Status.INVAL, domains.attach, 5, EP_B, 0)  # a translating attach to a bypass domain
    domains.set_bypass(False)
    assert host.placement == {EP_A: "identity", EP_B: "blocked"}
    assert domains.translate(EP_B, 0x1000) is None
    domains.detach(5, EP_A)
    assert host.placement[EP_A] == "blocked"
    agrees(domains, host)
    domains.reset()
    assert host.placement == {EP_A: "identity", EP_B: "identity"} and domains.bypass


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (("attach", 1, 0x99, 0), Status.NOENT),  # no such endpoint
        (("attach", 0, EP_A, 0), Status.RANGE),  # domain ids start at 1
        (("attach", 0x10000, EP_A, 0), Status.RANGE),
        (("attach", 1, EP_A, 2), Status.INVAL),  # unknown flag
        (("detach", 1, EP_B), Status.INVAL),  # not attached there
        (("detach", 1, 0x99), Status.NOENT),
        (("map", 9, 0, PAGE - 1, 0, MAP_F_READ), Status.NOENT),  # no domain 9
        (("map", 1, 0, PAGE - 1, 0, 0), Status.INVAL),  # neither read nor write
        (("map", 1, 0, PAGE - 1, 0, MAP_F_READ | 4), Status.INVAL),  # MMIO is not offered
        (("map", 1, 0x800, 0x17FF, 0, MAP_F_READ), Status.RANGE),  # not page aligned
        (("map", 1, 0, 0xFFE, 0, MAP_F_READ), Status.RANGE),  # end + 1 not aligned
        (("map", 1, 0, PAGE - 1, 0x800, MAP_F_READ), Status.RANGE),  # phys not aligned
        (("map", 1, PAGE, 0, 0, MAP_F_READ), Status.RANGE),  # end before start
        (("map", 1, 1 << 48, (1 << 48) + PAGE - 1, 0, MAP_F_READ), Status.RANGE),  # past input
        (("map", 1, 0, PAGE - 1, RAM[1], MAP_F_READ), Status.RANGE),  # not guest RAM
        (("map", 1, 0, (1 << 48) - 1, 0, MAP_F_READ), Status.RANGE),  # far more than RAM
        (("map", 1, 0x3000, 0x4FFF, 0, MAP_F_READ), Status.INVAL),  # overlaps 0x4000
        (("unmap", 1, 0x5000, 0x5FFF), Status.RANGE),  # would split 0x4000-0x5FFF
        (("unmap", 1, 0x2000, 0x1000), Status.RANGE),
        (("unmap", 7, 0, PAGE - 1), Status.NOENT),
    ],
)
def test_each_bad_request_gets_its_status_and_changes_nothing(
    request_: tuple[object, ...], status: Status
) -> None:
    domains, host = model()
    domains.attach(1, EP_A, 0)
    domains.map(1, 0x4000, 0x5FFF, 0x8000, MAP_F_READ)
    before = (copy.deepcopy(domains.domains), dict(domains.attached), copy.deepcopy(host.tables))
    name, *args = request_
    refused(status, getattr(domains, str(name)), *args)
    assert (domains.domains, domains.attached, host.tables) == before
    agrees(domains, host)


def test_an_unmap_takes_every_mapping_wholly_inside_and_skips_holes() -> None:
    domains, host = model()
    domains.attach(1, EP_A, 0)
    for start in (0x1000, 0x3000, 0x8000):
        domains.map(1, start, start + PAGE - 1, start, MAP_F_READ)
    domains.unmap(1, 0x0, 0x4FFF)
    assert host.tables[1] == {0x8000: (0x8000, PAGE, False)}
    domains.unmap(1, 0x20000, 0x2FFFF)  # nothing there: OK
    agrees(domains, host)


def test_a_host_iommu_that_refuses_leaves_everything_as_it_was() -> None:
    domains, host = model()
    host.fail = True
    refused(Status.DEVERR, domains.attach, 1, EP_A, 0)  # its create failed
    assert host.tables == {} and domains.domains == {}
    host.fail = False
    domains.attach(1, EP_A, 0)
    host.calls.clear()
    host.fail = True
    refused(Status.DEVERR, domains.map, 1, 0, PAGE - 1, 0, MAP_F_READ)
    assert host.tables == {1: {}}
    host.fail = True
    refused(Status.DEVERR, domains.attach, 2, EP_A, 0)  # 2's create fails: A stays in 1
    assert host.placement[EP_A] == 1 and 2 not in domains.domains
    agrees(domains, host)


def test_probe_reports_the_msi_window_and_the_hosts_reserved_ranges() -> None:
    host = FakeHostIommu((EP_A,))
    domains = GuestDomains(host, (EP_A,), in_ram, reserved=lambda ep: [(0xFED00000, 0xFED03FFF)])
    properties = domains.probe(EP_A, PROBE_SIZE)
    assert len(properties) == PROBE_SIZE
    found = [struct.unpack_from("<HHB3xQQ", properties, 24 * i) for i in range(3)]
    assert found == [
        (1, 20, 1, 0xFEE00000, 0xFEEFFFFF),
        (1, 20, 0, 0xFED00000, 0xFED03FFF),
        (0, 0, 0, 0, 0),
    ]
    refused(Status.NOENT, domains.probe, EP_B, PROBE_SIZE)


# hostile sequences

_U32 = st.integers(0, (1 << 32) - 1)
_U64 = st.integers(0, (1 << 64) - 1)
_PAGEISH = st.one_of(
    st.integers(0, 40).map(lambda n: n * PAGE),
    st.integers(0, 40).map(lambda n: n * PAGE - 1),
    _U64,
)
_DOMAIN = st.one_of(st.integers(0, 4), _U32)
_ENDPOINT = st.one_of(st.sampled_from((EP_A, EP_B, EP_C)), _U32)
_REQUESTS = st.one_of(
    st.tuples(st.just("attach"), _DOMAIN, _ENDPOINT, st.integers(0, 3)),
    st.tuples(st.just("detach"), _DOMAIN, _ENDPOINT),
    st.tuples(st.just("map"), _DOMAIN, _PAGEISH, _PAGEISH, _PAGEISH, st.integers(0, 7)),
    st.tuples(st.just("unmap"), _DOMAIN, _PAGEISH, _PAGEISH),
    st.tuples(st.just("set_bypass"), st.booleans()),
    st.tuples(st.just("reset")),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_REQUESTS, st.one_of(st.none(), st.integers(0, 3))), max_size=40))
def test_hostile_request_sequences_keep_the_host_and_the_model_in_step(
    requests: list[tuple[tuple[object, ...], int | None]],
) -> None:
    """Whatever the guest sends, and whichever step of a request the host IOMMU refuses: nothing
    but a status escapes, a refused request changes nothing the host did not, the host holds
    exactly what the model says (but for domains it would not destroy, which no endpoint can
    reach), and no mapping leaves RAM (the fake host asserts it)."""
    domains, host = model(EP_A, EP_B, EP_C)
    for (name, *args), refused_step in requests:
        # (a step the guest cannot be told of, in set_bypass and reset, is only logged)
        quiet = name in ("set_bypass", "reset")
        host.fail_at = None if quiet or refused_step is None else len(host.calls) + refused_step
        before = (copy.deepcopy(domains.domains), dict(domains.attached), domains.bypass)
        try:
            getattr(domains, str(name))(*args)
        except Refused as refusal:
            if refusal.status is not Status.DEVERR or name != "unmap":
                assert (domains.domains, domains.attached, domains.bypass) == before
        host.fail_at = None
        agrees(domains, host)


def test_a_step_no_status_answers_is_logged_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    domains, host = model()
    host.fail = True
    assert domains.set_bypass(False) is False
    assert "virtio-iommu: the host IOMMU refused it: block: Invalid argument" in caplog.text
    assert domains.set_bypass(True) is True
    host.fail = True
    assert domains.reset() is False


# the device, over virtio-pci

RING_BUFFERS = 0x300000


def head(kind: int) -> bytes:
    return bytes((kind, 0, 0, 0))


def attach(domain: int, endpoint: int, flags: int = 0) -> bytes:
    return head(1) + struct.pack("<III4x", domain, endpoint, flags)


def map_(domain: int, start: int, end: int, gpa: int, flags: int) -> bytes:
    return head(3) + struct.pack("<IQQQI", domain, start, end, gpa, flags)


def probe(endpoint: int) -> bytes:
    return head(5) + struct.pack("<I64x", endpoint)


def test_the_device_answers_linux_style_requests_through_its_ring() -> None:
    host = FakeHostIommu((EP_A,))
    domains = GuestDomains(host, (EP_A,), lambda gpa, size: gpa + size <= 4 << 20)
    backend = VirtioIommu(domains)
    with virtio_device(backend) as (machine, device, driver):
        config = [device.bar_read(0, DEVICE_OFFSET + o, 8) for o in (0, 8, 16)]
        assert config == [~(PAGE - 1) & (2**64 - 1), 0, (1 << 48) - 1]
        assert device.bar_read(0, DEVICE_OFFSET + 24, 4) == 1  # domain ids from 1
        assert device.bar_read(0, DEVICE_OFFSET + 32, 4) == PROBE_SIZE
        assert device.bar_read(0, DEVICE_OFFSET + 36, 1) == 1  # bypass at reset
        features = VIRTIO_F_VERSION_1 | VIRTIO_IOMMU_F_PROBE | VIRTIO_IOMMU_F_BYPASS_CONFIG
        device.config_write(PCI_COMMAND, 2, PCI_COMMAND_MASTER)
        assert driver.negotiate(features)
        driver.enable_msix()
        driver.setup_queue(0)
        driver.setup_queue(1)
        driver.write("device_status", STATUS_DRIVER_OK)
        device.bar_write(0, DEVICE_OFFSET + 36, 1, 0)  # (a driver may clear it at any time)
        assert host.placement[EP_A] == "blocked"
        requests = [
            (attach(1, EP_A), 4),
            (map_(1, 0x10000, 0x10FFF, 0x2000, MAP_F_READ | MAP_F_WRITE), 4),
            (map_(1, 0x10000, 0x10FFF, 0x3000, MAP_F_READ), 4),  # overlaps: INVAL
            (head(9) + bytes(16), 4),  # unknown type: UNSUPP
            (attach(1, EP_A)[:10], 4),  # short: INVAL
            (attach(1, EP_A)[:-1] + b"\x01", 4),  # reserved byte set: INVAL
            (probe(EP_A), PROBE_SIZE + 4),
        ]
        statuses = []
        for n, (request, writable) in enumerate(requests):
            buffer = RING_BUFFERS + n * 0x1000
            machine.memory.write(buffer, request)
            driver.post(0, [(buffer, len(request), False), (buffer + 0x800, writable, True)])
            driver.notify(0)
            used = driver.wait_used(0, n + 1)
            assert used[n][1] == writable
            statuses.append(machine.memory.read(buffer + 0x800 + writable - 4, 1)[0])
        assert statuses == [0, 0, Status.INVAL, Status.UNSUPP, Status.INVAL, Status.INVAL, 0]
        assert host.placement[EP_A] == 1 and host.tables == {1: {0x10000: (0x2000, PAGE, True)}}
        properties = machine.memory.read(RING_BUFFERS + 6 * 0x1000 + 0x800, 24)
        assert struct.unpack("<HHB3xQQ", properties) == (1, 20, 1, 0xFEE00000, 0xFEEFFFFF)
        assert (backend.requests, backend.refused) == (7, 4)
        driver.write("device_status", 0)  # a reset: every domain gone, bypass on
        assert host.tables == {} and host.placement[EP_A] == "identity"


def test_the_viot_names_the_iommu_and_each_endpoint_behind_it() -> None:
    """As Linux's drivers/acpi/viot.c reads it: a virtio-pci IOMMU node, and a one-function PCI
    range per endpoint whose output node is that IOMMU node."""
    table = acpi.viot(0x18, [0x20, 0x28])
    assert table[:4] == b"VIOT" and sum(table) % 256 == 0
    length = struct.unpack_from("<I", table, 4)[0]
    assert length == len(table) == 36 + 12 + 16 + 2 * 24
    count, first = struct.unpack_from("<HH", table, 36)
    assert (count, first) == (3, 48)
    assert struct.unpack_from("<BxHHH", table, first) == (3, 16, 0, 0x18)
    ranges = [struct.unpack_from("<BxHIHHHHH", table, first + 16 + 24 * i) for i in range(2)]
    assert ranges == [(1, 24, 0x20, 0, 0, 0x20, 0x20, 48), (1, 24, 0x28, 0, 0, 0x28, 0x28, 48)]


def test_the_domains_state_round_trips_into_a_new_host() -> None:
    domains, host = model(EP_A, EP_B, EP_C)
    domains.attach(1, EP_A, 0)
    domains.attach(1, EP_B, 0)
    domains.attach(3, EP_C, ATTACH_F_BYPASS)
    domains.map(1, 0x10000, 0x1FFFF, 0x200000, MAP_F_READ | MAP_F_WRITE)
    domains.map(1, 0x4000, 0x4FFF, 0x1000, MAP_F_READ)
    domains.set_bypass(False)
    state = from_plain(GuestDomainsState, to_plain(domains.save()))
    again, new_host = model(EP_A, EP_B, EP_C)
    again.restore(state)
    agrees(again, new_host)
    assert new_host.placement == host.placement and new_host.tables == host.tables
    assert again.translate(EP_B, 0x10008) == 0x200008 and not again.bypass


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda s: s.domains[0].endpoints.append(0x99), "no endpoint 0x99"),
        (lambda s: s.domains[0].mappings.append(s.domains[0].mappings[0]), "already mapped"),
        (lambda s: setattr(s.domains[0].mappings[0], "gpa", RAM[1]), "is not guest RAM"),
        (lambda s: s.domains[0].endpoints.clear(), "domain 1 has no endpoint"),
        (lambda s: s.domains.append(s.domains[0]), "in two domains"),
    ],
)
def test_a_saved_state_no_guest_could_make_is_refused_leaving_nothing(
    damage: Callable[[GuestDomainsState], object], why: str
) -> None:
    domains, _ = model()
    domains.attach(1, EP_A, 0)
    domains.map(1, 0, PAGE - 1, 0, MAP_F_READ)
    state = domains.save()
    damage(state)
    again, host = model()
    with pytest.raises(StateError, match=f"the saved virtio-iommu domains do not fit: .*{why}"):
        again.restore(state)
    assert (
        host.tables == {} and again.domains == {} and set(host.placement.values()) == {"identity"}
    )


def test_a_guest_that_maps_without_end_is_told_nomem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iommu_domains, "MAX_MAPPINGS", 3)
    domains, host = model()
    domains.attach(1, EP_A, 0)
    for n in range(3):
        domains.map(1, n * PAGE, n * PAGE + PAGE - 1, 0, MAP_F_READ)  # (one page, many IOVAs)
    refused(Status.NOMEM, domains.map, 1, 3 * PAGE, 4 * PAGE - 1, 0, MAP_F_READ)
    domains.unmap(1, 0, PAGE - 1)
    domains.map(1, 3 * PAGE, 4 * PAGE - 1, 0, MAP_F_READ)  # room again
    domains.detach(1, EP_A)  # the domain goes, and its mappings with it
    assert domains.mappings == 0
    agrees(domains, host)


def test_the_bypass_bit_is_taken_before_driver_ok() -> None:
    host = FakeHostIommu((EP_A,))
    with virtio_device(VirtioIommu(GuestDomains(host, (EP_A,), in_ram))) as (_, device, driver):
        assert driver.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_IOMMU_F_BYPASS_CONFIG)
        device.bar_write(0, DEVICE_OFFSET + 36, 1, 0)  # after FEATURES_OK, before DRIVER_OK
        assert host.placement[EP_A] == "blocked"
        assert device.bar_read(0, DEVICE_OFFSET + 36, 1) == 0


def test_a_bypass_or_reset_the_host_refuses_tells_the_driver_to_reset_the_device() -> None:
    """The endpoint's DMA is then not what the driver set up (after a refused block it still
    reaches all of RAM): DEVICE_NEEDS_RESET, with a configuration interrupt (virtio 1.2 §2.1.2);
    after a refused reset, as soon as the driver has set the device up again."""
    host = FakeHostIommu((EP_A,))
    with virtio_device(VirtioIommu(GuestDomains(host, (EP_A,), in_ram))) as (_, device, driver):
        device.config_write(PCI_COMMAND, 2, PCI_COMMAND_MASTER)
        assert driver.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_IOMMU_F_BYPASS_CONFIG)
        driver.setup_queue(0)
        driver.setup_queue(1)
        driver.write("device_status", STATUS_DRIVER_OK)
        assert not driver.read("device_status") & STATUS_DEVICE_NEEDS_RESET
        host.fail = True
        device.bar_write(0, DEVICE_OFFSET + 36, 1, 0)
        assert host.placement[EP_A] == "identity"  # (refused: it still reaches all of RAM)
        assert driver.read("device_status") & STATUS_DEVICE_NEEDS_RESET
        assert device.isr & ISR_CONFIG

        host.placement[EP_A] = 1  # (as if attached to a domain the host would not let go of)
        host.fail = True
        assert driver.negotiate(VIRTIO_F_VERSION_1)  # (it resets the device first)
        assert not driver.read("device_status") & STATUS_DEVICE_NEEDS_RESET
        driver.setup_queue(0)
        driver.setup_queue(1)
        driver.write("device_status", STATUS_DRIVER_OK)
        assert driver.read("device_status") & STATUS_DEVICE_NEEDS_RESET


def test_a_probe_when_the_host_cannot_say_its_ranges_is_deverr() -> None:
    def unknown(endpoint: int) -> list[tuple[int, int]]:
        raise BackingError("IOMMU_IOAS_IOVA_RANGES: Bad file descriptor")

    domains = GuestDomains(FakeHostIommu((EP_A,)), (EP_A,), in_ram, reserved=unknown)
    refused(Status.DEVERR, domains.probe, EP_A, PROBE_SIZE)
