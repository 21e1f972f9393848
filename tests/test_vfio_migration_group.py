"""A machine's migrating devices on the host, with stand-ins for the kernel's side (the real
one is the lab's: tests/lab/test_lab_vfio_device_state.py): the P2P order of a pause and a
resume across devices, a device that refuses, the destination's loading of data sent ahead
(hostile input included) and its acknowledgement, and assigned devices moved to other hosts."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import MethodType, SimpleNamespace
from typing import ClassVar

import msgpack
import pytest
from streams import sections_of

from pyvmm.errors import ConfigError
from pyvmm.machine.component import Components
from pyvmm.machine.config import DeviceConfig, MachineConfig
from pyvmm.machine.state import StateError
from pyvmm.migration import device_precopy
from pyvmm.migration.device_precopy import DeviceLoader, DevicePrecopy
from pyvmm.migration.stream import Section, SectionFlag, SectionType, StreamError, StreamWriter
from pyvmm.uapi.vfio import VfioDeviceState as State
from pyvmm.uapi.vfio import VfioMigrationFlag as Flag
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.migration import group as group_module
from pyvmm.vfio.migration.device import Journal, MigrationData
from pyvmm.vfio.migration.dma_log import LoggedPages
from pyvmm.vfio.migration.group import MigratingDevices
from pyvmm.vfio.migration.states import path
from pyvmm.vfio.passthrough.function import VfioPciFunction

ALL_FLAGS = Flag.STOP_COPY | Flag.P2P | Flag.PRE_COPY


class FakeMigration:
    """A device's migration that takes the kernel's ways (states.path) and logs each arc to
    the group's journal; `refuse` is a state it will not enter."""

    def __init__(self, name: str, journal: Journal, flags: Flag = ALL_FLAGS) -> None:
        self.name, self.journal, self.flags = name, journal, flags
        self.current = State.RUNNING
        self.data = None  # (no transfer under way)
        self.refuse: State | None = None
        self.recovered = False

    def move_to(self, target: State) -> None:
        for following in path(self.current, target, self.flags):
            if following is self.refuse:
                raise VfioError(f"{self.name}: {self.current.name} -> {following.name} failed")
            self.journal.append((self.name, self.current, following))
            self.current = following

    def missing(self) -> str:
        return ""  # (it migrates)

    def recover(self) -> None:
        self.recovered = True
        if self.current is State.ERROR:
            self.current = State.RUNNING  # (a reset)
        self.move_to(State.RUNNING)


def group_of(*devices: tuple[str, Flag]) -> tuple[MigratingDevices, list[FakeMigration]]:
    group = MigratingDevices()
    fakes = [FakeMigration(name, group.journal, flags) for name, flags in devices]
    group.devices.extend(fakes)  # type: ignore[arg-type]
    return group, fakes


def entered(group: MigratingDevices) -> list[tuple[str, State]]:
    return [(name, end) for name, _, end in group.journal]


def test_a_device_behind_the_guests_virtio_iommu_is_not_logged_but_sent_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its DMA addresses are the guest's IOVAs: its own log would mark the wrong pages, so it
    has none, and once it has stopped every page mapped for DMA is dirty."""

    def migration(device: FakeDevice, journal: Journal) -> FakeMigration:
        return FakeMigration(device.name, journal)

    monkeypatch.setattr(group_module, "DeviceMigration", migration)
    monkeypatch.setattr(group_module.dma_log, "supported", lambda device: True)
    monkeypatch.setattr(group_module, "DeviceDmaLog", lambda device, mapped: object())
    group = MigratingDevices(lambda: {0x100000: 2 * 4096})
    group.add(FakeDevice("behind"), dma_by_iova=True)
    group.add(FakeDevice("logged"))
    assert group.untracked == ["behind"] and list(group.dma_logs) == ["logged"]
    monkeypatch.setattr(group, "dma_logs", {})  # (the logged one's fake log reads nothing)
    group.pause()
    (pages,) = group.collect()
    assert (pages.gpa, pages.pages, pages.bitmap) == (0x100000, 2, b"\x03")


class FakeDevice:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeIommuLog:
    """The IOMMU's dirty log of some devices: `refuse` makes its start fail as an IOMMU without
    dirty tracking does; `pages` is what each collect reports."""

    def __init__(self, names: list[str], refuse: str = "") -> None:
        self.names, self.refuse = names, refuse
        self.started = self.stopped = False
        self.pages = [LoggedPages(0x200000, 1, b"\x01")]

    def start(self) -> None:
        if self.refuse:
            raise VfioError(self.refuse)
        self.started = True

    def collect(self) -> list[LoggedPages]:
        return self.pages

    def stop(self) -> None:
        self.stopped = True


def unlogged_group(
    monkeypatch: pytest.MonkeyPatch, refuse: str = ""
) -> tuple[MigratingDevices, list[FakeIommuLog]]:
    """A group of a device without a DMA log of its own and one behind the guest's vIOMMU,
    over two pages of RAM mapped for DMA, with an IOMMU log maker."""
    monkeypatch.setattr(
        group_module, "DeviceMigration", lambda d, journal: FakeMigration(d.name, journal)
    )
    monkeypatch.setattr(group_module.dma_log, "supported", lambda device: False)
    made: list[FakeIommuLog] = []

    def iommu_dirty(names: list[str]) -> tuple[FakeIommuLog, list[str]]:
        covered = [name for name in names if name != "an mdev"]  # (no IOMMU page table)
        made.append(FakeIommuLog(covered, refuse))
        return made[-1], covered

    group = MigratingDevices(lambda: {0x100000: 2 * 4096}, iommu_dirty)
    group.add(FakeDevice("plain"))
    group.add(FakeDevice("behind"), dma_by_iova=True)
    group.add(FakeDevice("an mdev"))
    return group, made


def test_a_device_without_its_own_log_is_tracked_by_its_iommus_dirty_bits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group, made = unlogged_group(monkeypatch)
    assert group.untracked == ["plain", "behind", "an mdev"]
    group.start()
    (iommu_log,) = made
    assert iommu_log.names == ["plain"] and iommu_log.started  # (not the one behind the vIOMMU)
    assert group.untracked == ["behind", "an mdev"]  # (an mdev spoils nothing for the others)
    assert [p.gpa for p in group.collect()] == [0x200000]  # the IOMMU's pages
    group.pause()
    found = [(p.gpa, p.pages, p.bitmap) for p in group.collect()]
    assert found == [(0x200000, 1, b"\x01"), (0x100000, 2, b"\x03")]  # and all, for the others
    group.stop()
    assert iommu_log.stopped and group.untracked == ["plain", "behind", "an mdev"]


def test_an_iommu_without_dirty_bits_leaves_the_device_to_be_sent_whole(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    group, made = unlogged_group(monkeypatch, refuse="plain: its IOMMU cannot track dirty pages")
    group.start()
    assert group.untracked == ["plain", "behind", "an mdev"] and group.iommu_log is None
    assert "plain: its IOMMU cannot track dirty pages" in caplog.text
    assert "plain: its driver logs no DMA writes: every page mapped" in caplog.text
    assert group.collect() == []  # (running: nothing can be known yet)
    group.pause()
    assert [(p.gpa, p.bitmap) for p in group.collect()] == [(0x100000, b"\x03")]
    group.stop()
    assert not made[0].stopped  # (never started)


def test_a_pause_takes_every_device_to_p2p_before_any_stops_and_a_resume_likewise() -> None:
    group, _ = group_of(("a", ALL_FLAGS), ("b", ALL_FLAGS))
    group.pause()
    assert entered(group) == [
        ("a", State.RUNNING_P2P),
        ("b", State.RUNNING_P2P),
        ("a", State.STOP),
        ("b", State.STOP),
    ]
    group.journal.clear()
    group.resume()
    assert entered(group) == [
        ("a", State.RUNNING_P2P),
        ("b", State.RUNNING_P2P),
        ("a", State.RUNNING),
        ("b", State.RUNNING),
    ]


def test_devices_saving_ahead_stop_into_stop_copy_and_one_without_p2p_skips_it() -> None:
    group, (a, b) = group_of(("a", ALL_FLAGS), ("b", Flag.STOP_COPY | Flag.PRE_COPY))
    a.current = b.current = State.PRE_COPY
    group.pause()
    assert entered(group) == [
        ("a", State.PRE_COPY_P2P),
        ("a", State.STOP_COPY),  # (the data fd carries on: no stop in between)
        ("b", State.STOP_COPY),
    ]
    group.journal.clear()
    group.resume()
    assert (a.current, b.current) == (State.RUNNING, State.RUNNING)
    assert entered(group)[0] == ("a", State.STOP)  # STOP_COPY -> STOP -> RUNNING_P2P: a first
    assert entered(group)[-1] == ("b", State.RUNNING)


def test_a_device_being_restored_or_already_stopped_is_left_where_it_is() -> None:
    group, (a, b) = group_of(("a", ALL_FLAGS), ("b", ALL_FLAGS))
    a.current, b.current = State.RESUMING, State.STOP
    group.pause()
    assert group.journal == []


def test_a_resume_resets_a_device_a_failure_left_in_error() -> None:
    group, (a, b) = group_of(("a", ALL_FLAGS), ("b", ALL_FLAGS))
    group.pause()
    b.current = State.ERROR
    group.resume()
    assert b.recovered and (a.current, b.current) == (State.RUNNING, State.RUNNING)


def test_a_device_that_refuses_to_stop_takes_the_others_back_to_running() -> None:
    group, (a, b) = group_of(("a", ALL_FLAGS), ("b", ALL_FLAGS))
    b.refuse = State.STOP
    with pytest.raises(VfioError, match="b: RUNNING_P2P -> STOP failed"):
        group.pause()
    assert (a.current, b.current) == (State.RUNNING, State.RUNNING)
    assert a.recovered and b.recovered


class FakeSavingAhead:
    """A part that takes data sent ahead (a passed-through device with PRE_COPY), and its
    state at the stop: `state`, given `stop_copy_pieces` at a time."""

    precopy = True
    migrates = True

    def __init__(self, name: str, *, refuse: bool = False, state: bytes = b"") -> None:
        self.name, self.refuse, self.loaded, self.state = name, refuse, b"", state

    def load_data(self, chunk: bytes) -> None:
        if self.refuse:
            raise VfioError("Invalid argument")
        self.loaded += chunk

    def stop_copy_pieces(self, size: int) -> Iterator[bytes]:
        for start in range(0, len(self.state), size):
            yield self.state[start : start + size]

    # Stateful, for the registry
    @dataclass
    class State:
        VERSION: ClassVar[int] = 1

    state_type: ClassVar[type] = State

    def save(self) -> FakeSavingAhead.State:
        return FakeSavingAhead.State()

    def restore(self, state: FakeSavingAhead.State) -> None:
        pass


def loader_of(*parts: FakeSavingAhead) -> tuple[DeviceLoader, list[int]]:
    components = Components()
    for index, part in enumerate(parts):
        components.add(f"pci/00:0{index + 1}.0", part)
    acks: list[int] = []
    return DeviceLoader(components, lambda: acks.append(1)), acks


def section(*item: object) -> Section:
    return Section(SectionType.DEVICE_DATA, msgpack.packb(list(item), use_bin_type=True))


def test_the_destination_acknowledges_once_every_device_has_its_initial_bytes() -> None:
    a, b = FakeSavingAhead("vfio a"), FakeSavingAhead("vfio b")
    loader, acks = loader_of(a, b)
    loader.load(section("pci/00:01.0", b"head", True), "the stream")
    assert acks == []  # (b has sent nothing yet)
    loader.load(section("pci/00:02.0", b"", False), "the stream")
    loader.load(section("pci/00:02.0", b"HEAD", True), "the stream")
    loader.load(section("pci/00:01.0", b"+more", True), "the stream")
    assert acks == [1]
    assert (a.loaded, b.loaded) == (b"head+more", b"HEAD")


def saving_ahead(*ids: object) -> Section:
    return Section(SectionType.SAVING_AHEAD, msgpack.packb(list(ids)), offset=12)


class FakePrecopySource:
    def __init__(self) -> None:
        self.began = False

    def precopy_begin(self) -> None:
        self.began = True

    def precopy_read(self) -> tuple[bytes, bool]:
        return b"chunk", True


def test_the_source_names_the_devices_it_saves_ahead_before_their_data() -> None:
    """SAVING_AHEAD, OPTIONAL (an older destination skips it and waits for all its own
    devices), then each round's DEVICE_DATA."""
    parts = {"pci/00:01.0": FakePrecopySource(), "pci/00:03.0": FakePrecopySource()}
    out = io.BytesIO()
    writer = StreamWriter(out)
    precopy = DevicePrecopy(parts)
    precopy.begin(writer)
    precopy.send(writer)
    writer.end()
    assert all(part.began for part in parts.values())
    found = [
        (kind, flags, msgpack.unpackb(payload))
        for kind, flags, payload in sections_of(out.getvalue())[:-1]
    ]
    assert found == [
        (SectionType.SAVING_AHEAD, SectionFlag.OPTIONAL, ["pci/00:01.0", "pci/00:03.0"]),
        (SectionType.DEVICE_DATA, 0, ["pci/00:01.0", b"chunk", True]),
        (SectionType.DEVICE_DATA, 0, ["pci/00:03.0", b"chunk", True]),
    ]
    assert precopy.initial_sent


def test_the_destination_waits_only_for_the_devices_the_source_saves_ahead() -> None:
    """A device that saves ahead here but not on the source (another driver, paired with
    --vfio-host) takes all its state at the stop: the acknowledgement does not wait for it."""
    a, b = FakeSavingAhead("vfio a"), FakeSavingAhead("vfio b")
    loader, acks = loader_of(a, b)
    loader.expect(saving_ahead("pci/00:02.0"), "the stream")
    assert loader.awaited == {"pci/00:02.0"}
    loader.load(section("pci/00:02.0", b"HEAD", True), "the stream")
    assert acks == [1] and (a.loaded, b.loaded) == (b"", b"HEAD")
    with pytest.raises(StreamError, match=r"for 'pci/00:01.0', which the source did not name"):
        loader.load(section("pci/00:01.0", b"x", True), "the stream")


def test_a_second_or_late_list_of_devices_saving_ahead_is_refused() -> None:
    """It would change what the acknowledgement waits for after the fact."""
    loader, _ = loader_of(FakeSavingAhead("vfio a"), FakeSavingAhead("vfio b"))
    loader.expect(saving_ahead("pci/00:01.0"), "the stream")
    with pytest.raises(StreamError, match="comes after another or after the data it names"):
        loader.expect(saving_ahead("pci/00:02.0"), "the stream")
    late, _ = loader_of(FakeSavingAhead("vfio a"))
    late.load(section("pci/00:01.0", b"x", False), "the stream")
    with pytest.raises(StreamError, match="comes after another or after the data it names"):
        late.expect(saving_ahead("pci/00:01.0"), "the stream")


@pytest.mark.parametrize(
    "ids, message",
    [
        (("pci/00:01.0", "pci/00:09.0"), "saves pci/00:09.0 ahead .*cannot take data ahead here"),
        ((), "is not a list of component ids"),
        (("pci/00:01.0", 7), "is not a list of component ids"),
    ],
)
def test_a_source_that_saves_ahead_what_cannot_take_it_here_is_refused(
    ids: tuple[object, ...], message: str
) -> None:
    loader, acks = loader_of(FakeSavingAhead("vfio a"))
    with pytest.raises(StreamError, match=f"devices saving ahead at byte 12.*{message}"):
        loader.expect(saving_ahead(*ids), "the stream")
    assert loader.awaited == {"pci/00:01.0"} and acks == []


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\xc1", "cannot be decoded"),
        (msgpack.packb(["pci/00:01.0", b"x"]), r"is not \[id, data, initial_done\]"),
        (msgpack.packb(["pci/00:01.0", "text", True]), r"is not \[id, data, initial_done\]"),
        (msgpack.packb(["pci/00:09.0", b"x", True]), "for 'pci/00:09.0', which saves nothing"),
    ],
)
def test_device_data_that_does_not_fit_is_refused_saying_where(
    payload: bytes, message: str
) -> None:
    loader, acks = loader_of(FakeSavingAhead("vfio a"))
    with pytest.raises(StreamError, match=message):
        loader.load(Section(SectionType.DEVICE_DATA, payload, offset=77), "the stream")
    assert acks == []


def test_a_device_that_refuses_its_data_is_named() -> None:
    loader, _ = loader_of(FakeSavingAhead("vfio 1234", refuse=True))
    with pytest.raises(StateError, match=r"^vfio 1234: the device refused the data sent ahead"):
        loader.load(section("pci/00:01.0", b"x", True), "the stream")


def test_assigned_devices_move_to_other_hosts_by_address_uuid_or_path() -> None:
    config = MachineConfig(
        64 << 20,
        1,
        (
            DeviceConfig("vfio-pci", {"host": "/sys/bus/mdev/devices/uuid-1"}, 1),
            DeviceConfig("vfio-pci", {"host": "0000:00:04.0", "backend": "iommufd"}, 2),
            DeviceConfig("virtio-rng", {}, 3),
        ),
    )
    moved = config.with_hosts({"uuid-1": "uuid-2", "0000:00:04.0": "0000:00:05.0"})
    assert [d.options.get("host") for d in moved.devices] == ["uuid-2", "0000:00:05.0", None]
    assert moved.devices[1].options["backend"] == "iommufd"
    assert config.with_hosts({}) == config
    with pytest.raises(ConfigError, match=r"no device of the saved machine is on host uuid-9"):
        config.with_hosts({"uuid-9": "uuid-2"})


# the devices' state at the stop, in pieces (DEVICE_STATE)


def test_a_devices_state_at_the_stop_goes_in_pieces_ahead_of_the_components(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(device_precopy, "SECTION_DATA", 4)
    a = FakeSavingAhead("vfio a", state=b"0123456789")
    components = Components()
    components.add("pci/00:01.0", a)
    out = io.BytesIO()
    writer = StreamWriter(out)
    assert device_precopy.send_stopped_states(writer, components) == 10
    writer.end()
    found = [
        (kind, msgpack.unpackb(payload)) for kind, _, payload in sections_of(out.getvalue())[:-1]
    ]
    pieces = [["pci/00:01.0", b"0123"], ["pci/00:01.0", b"4567"], ["pci/00:01.0", b"89"]]
    assert found == [(SectionType.DEVICE_STATE, piece) for piece in pieces]

    b = FakeSavingAhead("vfio b")
    loader, _ = loader_of(b)
    for kind, payload in found:
        loader.load_state(Section(kind, msgpack.packb(payload), offset=40), "the stream")
    assert b.loaded == b"0123456789"


def test_a_device_reads_its_stopped_state_to_the_end_in_pieces() -> None:
    """MigrationData.read_pieces over a pipe standing in for the data fd (its reads may come
    back shorter than asked, as a data fd's may)."""
    read_end, write_end = os.pipe()
    os.write(write_end, bytes(range(10)))
    os.close(write_end)
    data = MigrationData(read_end, State.STOP_COPY)
    try:
        assert list(data.read_pieces(4)) == [bytes([0, 1, 2, 3]), bytes([4, 5, 6, 7]), b"\x08\x09"]
    finally:
        data.close()


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (["pci/00:09.0", b"x"], r"for 'pci/00:09.0', which takes no device state here"),
        (["pci/00:01.0", b"x", True], r"at byte 40 is not \[id, data\]"),
        ({"id": 1}, r"at byte 40 is not \[id, data\]"),
    ],
)
def test_device_state_for_no_such_device_or_malformed_is_refused(
    payload: object, error: str
) -> None:
    loader, _ = loader_of(FakeSavingAhead("vfio a"))
    with pytest.raises(StreamError, match=error):
        loader.load_state(Section(SectionType.DEVICE_STATE, msgpack.packb(payload), offset=40), "s")


def test_a_device_that_refuses_its_stopped_state_is_named() -> None:
    loader, _ = loader_of(FakeSavingAhead("vfio a", refuse=True))
    section = Section(SectionType.DEVICE_STATE, msgpack.packb(["pci/00:01.0", b"x"]), offset=40)
    with pytest.raises(StateError, match="vfio a: the device refused its state: Invalid argument"):
        loader.load_state(section, "the stream")


class PipeMigration:
    """A device's migration whose every STOP_COPY opens a new data fd (a pipe) holding the
    device's whole state, `state`; another STOP_COPY on the way keeps the fd it has."""

    def __init__(self, state: bytes) -> None:
        self.state, self.current, self.transfers = state, State.STOP, 0
        self.data: MigrationData | None = None

    def move_to(self, target: State) -> MigrationData | None:
        if target is State.STOP_COPY and self.current is not State.STOP_COPY:
            read_end, write_end = os.pipe()
            os.write(write_end, self.state)
            os.close(write_end)
            self.data, self.transfers = MigrationData(read_end, target), self.transfers + 1
        elif target is State.STOP and self.data is not None:
            self.data.close()
            self.data = None
        self.current = target
        return self.data


def stopped_function(state: bytes) -> SimpleNamespace:
    """The parts of a VfioPciFunction its stop's reads use, over a PipeMigration."""
    function = SimpleNamespace(
        name="vfio a", migration=PipeMigration(state), _stop_read=None, _stop_read_whole=False
    )
    for method in ("stop_copy_pieces", "_save_device", "_unread_stop_copy"):
        setattr(function, method, MethodType(getattr(VfioPciFunction, method), function))
    return function


def test_a_save_that_failed_after_the_pieces_were_read_starts_the_device_state_again() -> None:
    """The machine stays paused, the device in STOP_COPY on a data fd read out (in part or
    whole): a second try must not take an empty rest for the device's state."""
    function = stopped_function(b"0123456789")
    assert b"".join(function.stop_copy_pieces(4)) == b"0123456789"
    # ... then the save failed before it reached this function; tried again:
    assert b"".join(function.stop_copy_pieces(4)) == b"0123456789"
    assert function.migration.transfers == 2
    assert function._save_device() == b""  # (its state went in the pieces)
    assert function.migration.current is State.STOP

    half = stopped_function(b"0123456789")
    pieces = half.stop_copy_pieces(4)
    assert next(pieces) == b"0123"  # (the stream broke here)
    assert half._save_device() == b"0123456789"  # a save of its own: all of it, again


def test_a_device_forgotten_while_the_iommu_tracks_it_ends_that_tracking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(Its binding is going: the log's HWPT must not outlive it; the devices left are sent
    whole once stopped, as untracked ones are.)"""
    group, made = unlogged_group(monkeypatch)
    group.start()
    group.forget("plain")
    assert made[0].stopped and group.iommu_log is None
    assert group.untracked == ["behind", "an mdev"]


def test_a_device_whose_dma_the_iommu_tracks_is_not_moved_off_its_hwpt() -> None:
    """A move would end the tracking unseen, and the pages its DMA wrote would be lost to the
    migration: refused before the kernel is asked anything."""
    from pyvmm.vfio.iommufd.backend import IommufdContext

    context = SimpleNamespace(migrations=SimpleNamespace(iommu_logged=["0000:00:04.0"]))
    with pytest.raises(VfioError, match=r"0000:00:04.0: its DMA writes are being tracked"):
        IommufdContext.attach(context, "0000:00:04.0", 7)  # type: ignore[arg-type]
