"""Components without KVM: each emulated device's save -> plain data -> restore into a new
device -> save gives the same state, whatever the guest did to it first (hypothesis); the
plain-data codec refuses what does not fit; the registry checks every state before it restores
any and undoes a half-done pause; the parts with threads of their own pause between requests."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pcibench import Pci, virtio_device

from pyvmm.devices import rtc, serial
from pyvmm.devices.virtio import pci_layout
from pyvmm.machine import state as state_module
from pyvmm.machine.component import Components, SavedState
from pyvmm.machine.console import ConsoleInput
from pyvmm.machine.state import StateError, from_plain, prepare, to_plain

ACCESSES = st.lists(
    st.tuples(st.integers(0, 7), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)),
    max_size=80,
)


def round_trip(make: Callable[[], Any], original: Any) -> None:
    state = original.save()
    plain = to_plain(state)
    copy = make()
    copy.restore(from_plain(type(state), plain))
    assert copy.save() == state
    assert to_plain(copy.save()) == plain


@settings(max_examples=80, deadline=None)
@given(ACCESSES, st.binary(max_size=80))
def test_uart_state_round_trips_after_any_traffic(accesses, received: bytes) -> None:
    def make() -> serial.Serial8250:
        return serial.Serial8250(lambda data: None, lambda level: None)

    uart = make()
    for offset, _, value in accesses:
        uart.write(offset, 1, value & 0xFF)
        uart.read((offset + value) % 8, 1)
    uart.receive(received)
    round_trip(make, uart)


class FixedClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 255)), max_size=120))
def test_rtc_state_round_trips_after_any_traffic(accesses: list[tuple[int, int]]) -> None:
    clock = FixedClock()
    device = rtc.CmosRtc(clock)
    for port, value in accesses:
        device.write(port, 1, value)
        device.read(port, 1)
    round_trip(lambda: rtc.CmosRtc(clock), device)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["config", "bar", "memory"]),
            st.integers(0, 0xFFF),
            st.sampled_from([1, 2, 4]),
            st.integers(0, 2**32 - 1),
        ),
        max_size=60,
    )
)
def test_pci_test_device_and_bus_state_round_trips_after_any_traffic(ops) -> None:
    first = Pci()
    second = Pci()
    try:
        for kind, offset, size, value in ops:
            value &= (1 << (8 * size)) - 1
            if kind == "config":
                first.bus.config_write(3 << 3, offset, size, value)
            elif kind == "bar":
                index = sorted(first.dev.scratch)[value % len(first.dev.scratch)]
                first.dev.bar_write(index, offset % 0x100, size, value)
            else:
                first.dev.device_memory.view[offset] = value & 0xFF
        first.cf8(3, len(ops) * 4 % 0x100)  # the guest between its CF8 and CFC accesses
        saved = first.dev.save()
        bus_state = first.bus.save()
        second.dev.restore(from_plain(type(saved), to_plain(saved)))
        second.bus.restore(from_plain(type(bus_state), to_plain(bus_state)))
        assert second.dev.save() == saved and second.bus.save() == bus_state
        for index in first.dev.bars:  # the BARs are mapped the same way in both
            assert second.dev.bar_address(index) == first.dev.bar_address(index)
        assert [r.gpa for r in second.device_regions()] == [r.gpa for r in first.device_regions()]
    finally:
        first.close()
        second.close()


# the codec


@dataclass
class Inner:
    value: int
    label: str | None = None


@dataclass
class Outer:
    VERSION: ClassVar[int] = 3

    blob: bytes
    flag: bool
    ratio: float
    inners: list[Inner]
    table: dict[int, bytes]
    pair: tuple[int, ...]
    extra: Any = None
    nested: list[Inner] = field(default_factory=list)


def test_plain_data_round_trip_of_nested_types() -> None:
    state = Outer(
        b"\x00\xff", True, 1.5, [Inner(1), Inner(2, "x")], {7: b"a"}, (1, 2), {"k": [1, "v"]}
    )
    plain = to_plain(state)
    assert plain["inners"] == [{"value": 1, "label": None}, {"value": 2, "label": "x"}]
    assert from_plain(Outer, plain) == state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.update(blob="text"), r"Outer.blob: expected bytes, got str"),
        (lambda p: p.update(flag=1), r"Outer.flag: expected bool, got int"),
        (lambda p: p["inners"][0].update(value=True), r"Outer.inners\[0\].value: expected int"),
        (lambda p: p.pop("ratio"), r"Outer: fields missing ratio"),
        (lambda p: p.update(surprise=1), r"Outer: fields unknown 'surprise'"),
        (lambda p: p.update({"two\nlines": 1}), r"Outer: fields unknown 'two\\nlines'"),
        (lambda p: p.update(table={"7": b""}), r"Outer.table key: expected int, got str"),
        (lambda p: p.update(inners={}), r"Outer.inners: expected a list, got dict"),
        (lambda p: p.update(extra=object()), r"Outer.extra: a object is not plain data"),
        (lambda p: p["inners"].append(5), r"Outer.inners\[2\]: expected a record, got int"),
    ],
)
def test_plain_data_that_does_not_fit_is_refused_with_where(change, message: str) -> None:
    plain = to_plain(Outer(b"", False, 0.0, [Inner(1), Inner(2)], {}, ()))
    change(plain)
    with pytest.raises(StateError, match=message):
        from_plain(Outer, plain)


# the registry


class Part:
    """A stateful, pausable part that logs what is done to it."""

    @dataclass
    class State:
        VERSION: ClassVar[int] = 1
        value: int

    state_type: ClassVar[type] = State

    def __init__(self, name: str, log: list[str], *, refuse: bool = False) -> None:
        self.name, self.log, self.refuse, self.value = name, log, refuse, 0

    def save(self) -> Part.State:
        return Part.State(self.value)

    def check(self, state: Part.State) -> None:
        if state.value < 0:
            raise StateError(f"{self.name}: negative")

    def restore(self, state: Part.State) -> None:
        self.log.append(f"restore {self.name}")
        self.value = state.value

    def pause(self) -> None:
        if self.refuse:
            raise RuntimeError(f"{self.name} cannot pause")
        self.log.append(f"pause {self.name}")

    def resume(self) -> None:
        self.log.append(f"resume {self.name}")


def test_restore_checks_every_state_before_touching_any_part() -> None:
    log: list[str] = []
    parts = Components()
    for name in ("a", "b", "c"):
        parts.add(name, Part(name, log))
    saved = parts.save_all()
    assert [s.component for s in saved] == ["a", "b", "c"]
    bad = [
        SavedState(s.component, s.kind, s.version, {"value": -1 if s.component == "c" else 5})
        for s in saved
    ]
    with pytest.raises(StateError, match="c: negative"):
        parts.restore_all(bad)
    assert log == []
    with pytest.raises(StateError, match="lacks c"):
        parts.restore_all(saved[:2])
    with pytest.raises(StateError, match="component 'a' twice"):
        parts.restore_all([*saved, saved[0]])
    with pytest.raises(StateError, match="saved state is a 'Other', not a State"):
        parts.restore_all([SavedState("a", "Other", 1, {"value": 1}), *saved[1:]])
    good = [SavedState(s.component, s.kind, s.version, {"value": 7}) for s in saved]
    parts.restore_all(good)
    assert log == ["restore a", "restore b", "restore c"]


def test_a_failed_pause_resumes_the_parts_already_paused() -> None:
    log: list[str] = []
    parts = Components()
    parts.add("a", Part("a", log))
    parts.add("b", Part("b", log))
    parts.add("c", Part("c", log, refuse=True))
    with pytest.raises(RuntimeError, match="c cannot pause"):
        parts.pause_all()
    assert log == ["pause a", "pause b", "resume b", "resume a"]
    with pytest.raises(ValueError, match="taken"):
        parts.add("a", Part("a", log))
    with pytest.raises(TypeError, match="neither Pausable nor Stateful"):
        parts.add("d", object())


# pausing the parts with threads of their own


def test_a_paused_virtio_worker_serves_a_doorbell_only_after_resume() -> None:
    with virtio_device() as (machine, device, driver):
        driver.start(0)
        doorbell = machine.vm.ioeventfds[(device.bar_address(0) + pci_layout.NOTIFY_OFFSET, 2)]
        device.pause()
        device.pause()  # twice is once
        driver.post(0, [(0x200000, 16, True)])
        os.eventfd_write(doorbell, 1)  # what KVM does on the guest's doorbell write
        time.sleep(0.1)
        assert driver.used(0) == []
        device.resume()
        assert len(driver.wait_used(0, 1)) == 1
        device.pause()
        driver.post(0, [(0x200100, 16, True)])
        os.eventfd_write(doorbell, 1)
    # closed while paused: the worker is gone, the request never served
    assert not device._worker.is_alive()


def test_a_paused_console_input_hands_nothing_to_the_uart() -> None:
    received = bytearray()
    got = threading.Event()

    def receive(data: bytes) -> int:
        received.extend(data)
        got.set()
        return len(data)

    read_end, write_end = os.pipe()
    pump = ConsoleInput(read_end, receive)
    try:
        os.write(write_end, b"a")
        assert got.wait(5) and received == b"a"
        got.clear()
        pump.pause()
        os.write(write_end, b"bc")
        time.sleep(0.2)
        assert received == b"a"
        pump.resume()
        deadline = time.monotonic() + 5
        while received != b"abc":
            assert time.monotonic() < deadline, received
            time.sleep(0.01)
    finally:
        pump.close()
        os.close(read_end)
        os.close(write_end)


@dataclass
class _Leaf:
    VERSION: ClassVar[int] = 1
    value: int


@dataclass
class _Tree:
    VERSION: ClassVar[int] = 1
    leaves: list[_Leaf]
    named: dict[str, _Leaf | None]
    first: _Leaf


def test_a_prepared_state_type_is_decoded_without_evaluating_annotations() -> None:
    """`prepare` learns a state type and the types inside it ahead (a migration's destination,
    before the downtime): decoding one then evaluates no annotation."""
    state_module._record.cache_clear()
    prepare(_Tree)
    learned = state_module._record.cache_info().misses
    tree = _Tree([_Leaf(1)], {"a": _Leaf(2), "b": None}, _Leaf(3))
    assert from_plain(_Tree, to_plain(tree)) == tree
    assert state_module._record.cache_info().misses == learned == 2


class UpgradingPart(Part):
    """A part whose state is at version 2; version 1 lacked `value` (it meant 0)."""

    @dataclass
    class State:
        VERSION: ClassVar[int] = 2
        value: int

    state_type: ClassVar[type] = State

    @staticmethod
    def upgrade_state(version: int, data: object) -> object:
        return {"value": 0} if version == 1 and data == {} else None


def test_an_older_state_is_upgraded_by_its_part_and_a_newer_one_refused() -> None:
    parts = Components()
    part = UpgradingPart("a", [])
    parts.add("a", part)
    part.value = 9
    parts.restore_all([SavedState("a", "State", 1, {})])
    assert part.value == 0
    with pytest.raises(StateError, match=r"version 1; this pyvmm reads version 2 and some older"):
        parts.restore_all([SavedState("a", "State", 1, {"value": 3})])  # (not a version 1)
    with pytest.raises(StateError, match=r"version 3; this pyvmm reads version 2"):
        parts.restore_all([SavedState("a", "State", 3, {"value": 3})])
    plain = Components()
    plain.add("b", Part("b", []))
    with pytest.raises(StateError, match=r"version 0; this pyvmm reads version 1 only"):
        plain.restore_all([SavedState("b", "State", 0, {"value": 3})])
