"""A snapshot's state file is untrusted input (hypothesis): truncated, bit-flipped, reordered,
forged (valid checksums around made-up contents) and random streams are each either restored
or refused with one line (a PyvmmError), never a traceback, never a machine left built."""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import msgpack
import pytest
from guestbuild import requires_kvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_snapshot import counting_machine

from pyvmm.errors import PyvmmError
from pyvmm.machine.console import CaptureConsole
from pyvmm.migration import snapshot
from pyvmm.migration.stream import MAGIC, SectionType, StreamReader, StreamWriter

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


def sections_of(state: bytes) -> list[tuple[int, int, bytes]]:
    reader = StreamReader(io.BytesIO(state))
    found = []
    while True:
        section = reader.next()
        found.append((section.type, section.flags, section.payload))
        if section.type == SectionType.END:
            return found


def stream(sections: list[tuple[int, int, bytes]]) -> bytes:
    """Sections as a stream with valid checksums (and no END unless given one)."""
    out = io.BytesIO()
    writer = StreamWriter(out)
    for kind, flags, payload in sections:
        writer.section(kind, payload, flags=flags)  # type: ignore[arg-type]
    return out.getvalue()


def restore_or_refuse(original: Path, state: bytes) -> None:
    """Put `state` beside the original's memory file and restore it: it works, or it is
    refused with one line."""
    target = original.parent / f"case{next(_names)}"
    target.mkdir()
    try:
        os.link(original / "memory", target / "memory")
        (target / "state").write_bytes(state)
        try:
            machine = snapshot.restore(snapshot.read(target), CaptureConsole())
        except PyvmmError as err:
            assert str(err) and "\n" not in str(err), str(err)
        else:
            machine.close()
    finally:
        for child in target.iterdir():
            child.unlink()
        target.rmdir()


@FUZZ
@given(st.data())
def test_a_truncated_state_is_refused(original: Path, data: st.DataObject) -> None:
    state = (original / "state").read_bytes()
    cut = data.draw(st.integers(0, len(state) - 1))
    restore_or_refuse(original, state[:cut])


@FUZZ
@given(st.data())
def test_a_bit_flipped_state_is_refused(original: Path, data: st.DataObject) -> None:
    state = bytearray((original / "state").read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        bit = data.draw(st.integers(0, len(state) * 8 - 1))
        state[bit // 8] ^= 1 << (bit % 8)
    restore_or_refuse(original, bytes(state))


@FUZZ
@given(st.data())
def test_reordered_or_dropped_sections_are_refused(original: Path, data: st.DataObject) -> None:
    sections = sections_of((original / "state").read_bytes())
    body = data.draw(st.permutations(sections[:-1]))
    keep = data.draw(st.integers(0, len(body)))
    restore_or_refuse(original, stream([*body[:keep], sections[-1]]))


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
def test_forged_contents_with_valid_checksums_are_refused(
    original: Path, data: st.DataObject
) -> None:
    """A stream that passes every checksum but whose sections hold what a hostile writer
    chose: a component's fields, the configuration, the RAM layout."""
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
    restore_or_refuse(original, stream(sections))


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_after_a_valid_header_are_refused(original: Path, junk: bytes) -> None:
    restore_or_refuse(original, MAGIC + b"\x01\0\0\0\0\0\0\0" + junk)


def test_an_unknown_optional_section_is_skipped_and_an_unknown_other_refused(
    original: Path,
) -> None:
    sections = sections_of((original / "state").read_bytes())
    skipped = [*sections[:2], (99, 1, b"from a newer pyvmm"), *sections[2:]]
    restore_or_refuse(original, stream(skipped))
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
