"""A snapshot's state file is untrusted input (hypothesis): truncated, bit-flipped and random
streams are refused with one line (a PyvmmError) that says why; sections dropped or out of the
format's order are refused, and those the format lets move are taken; forged contents (valid
checksums around made-up fields) are restored or refused with one line. Never a traceback,
never a machine left built."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import msgpack
import pytest
from counting import counting_machine
from guestbuild import requires_kvm
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from streams import DAMAGED, sections_of, stream

from pyvmm.errors import PyvmmError
from pyvmm.machine.console import CaptureConsole
from pyvmm.migration import snapshot
from pyvmm.migration.stream import MAGIC, SectionType

pytestmark = [pytest.mark.kvm, requires_kvm]

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_names = itertools.count()


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("fuzz") / "snap"
    with counting_machine() as machine:
        machine.start()
        assert machine.pause()
        snapshot.write(machine, target, {"console": "capture"})
        machine.stop()
        machine.wait()
    return target


def restore(original: Path, state: bytes) -> str | None:
    """Put `state` beside the original's memory file and restore it: None if it was restored
    (the machine is closed again), else the refusal, checked to be one line."""
    target = original.parent / f"case{next(_names)}"
    target.mkdir()
    try:
        os.link(original / "memory", target / "memory")
        (target / "state").write_bytes(state)
        try:
            machine = snapshot.restore(snapshot.read(target), CaptureConsole())
        except PyvmmError as err:
            assert str(err) and "\n" not in str(err), str(err)
            return str(err)
        machine.close()
        return None
    finally:
        for child in target.iterdir():
            child.unlink()
        target.rmdir()


def assert_refused(refusal: str | None, reason: str) -> None:
    assert refusal is not None, "the snapshot was restored"
    assert re.search(reason, refusal), refusal


@FUZZ
@given(st.data())
def test_a_truncated_state_is_refused(original: Path, data: st.DataObject) -> None:
    state = (original / "state").read_bytes()
    cut = data.draw(st.integers(0, len(state) - 1))
    assert_refused(restore(original, state[:cut]), DAMAGED)


@FUZZ
@given(st.data())
def test_a_bit_flipped_state_is_refused(original: Path, data: st.DataObject) -> None:
    state = bytearray((original / "state").read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        bit = data.draw(st.integers(0, len(state) * 8 - 1))
        state[bit // 8] ^= 1 << (bit % 8)
    if state == (original / "state").read_bytes():  # (the same bit flipped back)
        assert restore(original, bytes(state)) is None
    else:
        assert_refused(restore(original, bytes(state)), DAMAGED)


def refusal_of_order(sections: list[tuple[int, int, bytes]], components: int) -> str | None:
    """Why the format refuses this sequence of sections, or None if it is a snapshot: CONFIG
    first, then INFO at most once anywhere, every component once, then the RAM layout."""
    kinds = [kind for kind, _, _ in sections]
    if not kinds or kinds[0] != SectionType.CONFIG:
        return "does not start with the machine's configuration"
    if SectionType.RAM_LAYOUT not in kinds:
        return "has no RAM layout|lacks"
    if SectionType.COMPONENT in kinds[kinds.index(SectionType.RAM_LAYOUT) :]:
        return "COMPONENT section out of place"
    if kinds.count(SectionType.COMPONENT) < components:
        return "the saved state lacks"
    return None


@FUZZ
@given(st.data())
def test_sections_dropped_or_out_of_order_are_refused_and_moved_ones_taken(
    original: Path, data: st.DataObject
) -> None:
    sections = sections_of((original / "state").read_bytes())
    if data.draw(st.booleans()):  # anything goes
        body = data.draw(st.permutations(sections[:-1]))
        kept = body[: data.draw(st.integers(0, len(body)))]
    else:  # what the format lets move: INFO and the components, between CONFIG and RAM layout
        config, *movable, ram = sections[:-1]
        movable = data.draw(st.permutations(movable))
        if data.draw(st.booleans()):
            movable = [s for s in movable if s[0] != SectionType.INFO]
        kept = [config, *movable, ram]
    components = sum(1 for kind, _, _ in sections if kind == SectionType.COMPONENT)
    reason = refusal_of_order(kept, components)
    event("refused" if reason else "restored")
    refusal = restore(original, stream([*kept, sections[-1]]))
    if reason is None:
        assert refusal is None, refusal
    else:
        assert_refused(refusal, reason)


SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=64)
PLAIN = st.recursive(
    SCALARS | st.text(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def like(value: object) -> st.SearchStrategy[object]:
    """Values of the same shape as `value` (what type checks alone would let through)."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-(2**63), 2**64 - 1) | st.integers(0, 2 * max(value, 1))
    if isinstance(value, bytes):
        return st.binary(min_size=len(value), max_size=len(value)) | st.binary(max_size=64)
    if isinstance(value, list) and value:
        return st.lists(like(value[0]), max_size=len(value) + 2)
    if isinstance(value, dict) and value:
        key = sorted(value, key=str)[0]
        return like(value[key]).map(lambda new: {**value, key: new})
    return st.just(value)


@FUZZ
@given(st.data())
def test_forged_contents_with_valid_checksums_are_restored_or_refused_in_one_line(
    original: Path, data: st.DataObject
) -> None:
    """A stream that passes every checksum but whose sections hold what a hostile writer
    chose: a component's fields, the configuration, the RAM layout. A forged value may be one
    the component accepts (a register's contents), so this asks only that nothing breaks:
    no traceback, no machine left built, a refusal in one line."""
    sections = sections_of((original / "state").read_bytes())
    index = data.draw(st.integers(0, len(sections) - 2))
    kind, flags, payload = sections[index]
    if kind == SectionType.COMPONENT:
        component, state_kind, version, fields = msgpack.unpackb(payload, strict_map_key=False)
        if fields and isinstance(fields, dict):
            name = data.draw(st.sampled_from(sorted(fields)))
            fields[name] = data.draw(st.one_of(PLAIN, like(fields[name])))
        payload = msgpack.packb([component, state_kind, version, fields], use_bin_type=True)
    else:
        payload = data.draw(st.one_of(st.binary(max_size=200), PLAIN.map(msgpack.packb)))
    sections[index] = (kind, flags, payload)
    restore(original, stream(sections))


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_after_a_valid_header_are_refused(original: Path, junk: bytes) -> None:
    refusal = restore(original, MAGIC + b"\x01\0\0\0\0\0\0\0" + junk)
    assert_refused(refusal, f"{DAMAGED}|does not start with the machine's configuration")


def test_an_unknown_optional_section_is_skipped_and_an_unknown_other_refused(
    original: Path,
) -> None:
    sections = sections_of((original / "state").read_bytes())
    skipped = [*sections[:2], (99, 1, b"from a newer pyvmm"), *sections[2:]]
    assert restore(original, stream(skipped)) is None
    target = original.parent / "optional"
    target.mkdir()
    os.link(original / "memory", target / "memory")
    (target / "state").write_bytes(stream(skipped))
    assert snapshot.read(target).config == snapshot.read(original).config
    (target / "state").write_bytes(stream([*sections[:2], (99, 0, b"x"), *sections[2:]]))
    with pytest.raises(PyvmmError, match=r"type 99 at byte .* does not know"):
        snapshot.read(target)
    (target / "state").write_bytes(stream([*sections[:1], (99, 1, b"skip me"), *sections[1:]]))
    assert snapshot.read(target).saved == snapshot.read(original).saved  # before INFO too
    flagged = [(kind, 2 if kind == SectionType.INFO else flags, p) for kind, flags, p in sections]
    (target / "state").write_bytes(stream(flagged))
    with pytest.raises(PyvmmError, match=r"has flags 0x2, which this pyvmm does not know"):
        snapshot.read(target)
    (target / "state").write_bytes(stream(sections) + b"\0")
    with pytest.raises(PyvmmError, match=r"has data after its END"):
        snapshot.read(target)
