"""The migration stream is untrusted input to a destination (hypothesis): a real stream cut
short, bit-flipped or replaced by random bytes is refused with one line (a PyvmmError) that says
why, never a traceback, never a machine left built; pages aimed anywhere by a source whose
checksums are valid are refused unless they lie whole in RAM, and then they are written there."""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import struct
import threading
import time

import pytest
from guestbuild import guest, requires_kvm
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from streams import DAMAGED, sections_of, stream

from pyvmm.board.machine import Machine
from pyvmm.errors import PyvmmError
from pyvmm.machine.console import CaptureConsole
from pyvmm.migration.destination import receive_from
from pyvmm.migration.pages import CHUNK
from pyvmm.migration.source import Migration
from pyvmm.migration.stream import SectionType, StreamReader
from pyvmm.migration.transport import Endpoint

PAGE_SECTIONS = [SectionType.PAGES, SectionType.ZERO_PAGES, SectionType.PAGE_RUNS]

pytestmark = [pytest.mark.kvm, requires_kvm]

FUZZ = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ENDPOINT = Endpoint.parse("unix:/nonexistent/fuzz.sock")  # only named in messages


def record_a_migration(path: str) -> bytes:
    """The bytes a real migration of the counter guest sends (to a destination that records
    them and answers as a real one does). The destination stalls a moment after the first
    pages, and the source waits until it has read all (DRAINED 0) before it pauses: so the
    guest surely runs, and dirties pages, while the dirty log is on, however busy the host."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    recorded = io.BytesIO()
    stalled = False

    def destination() -> None:
        nonlocal stalled
        conn, _ = listener.accept()
        with conn:
            reader = StreamReader(conn.makefile("rb"))
            while True:
                section = reader.next()
                recorded.write(
                    struct.pack("<HHI", section.type, section.flags, len(section.payload))
                )
                recorded.write(section.payload)
                if section.type == SectionType.INFO:
                    conn.sendall(b'{"accept": true}\n')
                if section.type == SectionType.PAGES and not stalled:
                    time.sleep(0.3)
                    stalled = True
                if section.type == SectionType.END:
                    conn.sendall(b'{"resumed": true}\n')
                    return

    thread = threading.Thread(target=destination)
    thread.start()
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("counter")))
        source.add_device("virtio-rng")
        source.start()
        source.console.wait_for(r"count 1024\n", 30)  # type: ignore[attr-defined]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("pyvmm.migration.source.DRAINED", 0)
            Migration(source, Endpoint.parse(f"unix:{path}"), info={}).run()
    thread.join(30)
    listener.close()
    data, sections = recorded.getvalue(), []
    at = 0
    while at < len(data):
        kind, flags, length = struct.unpack_from("<HHI", data, at)
        sections.append((kind, flags, data[at + 8 : at + 8 + length]))
        at += 8 + length
    return stream(sections)


@pytest.fixture(scope="module")
def migration_stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return record_a_migration(str(tmp_path_factory.mktemp("mig") / "in.sock"))


def take(data: bytes) -> Machine | str:
    """Feed `data` to a destination as a source would: the machine it took in (the caller
    closes it), or its refusal, checked to be one line."""
    ours, theirs = socket.socketpair()

    def send() -> None:
        with contextlib.suppress(OSError):  # the destination stopped reading: it refused
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)
            while theirs.recv(65536):
                pass  # its answers
        theirs.close()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        return receive_from(ours, ENDPOINT, lambda info: CaptureConsole()).machine
    except PyvmmError as err:
        assert str(err) and "\n" not in str(err), str(err)
        return str(err)
    finally:
        ours.close()
        sender.join(30)


def assert_refused(outcome: Machine | str, reason: str) -> None:
    if isinstance(outcome, Machine):
        outcome.close()
        pytest.fail("the destination took the machine in")
    assert re.search(reason, outcome), outcome


# (this host has userfaultfd, so its destinations can take post-copy: tests/test_userfaultfd.py)
ACCEPTED = {"accept": True, "postcopy": True}


def test_the_real_stream_is_taken_in(migration_stream: bytes) -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(migration_stream)
    theirs.shutdown(socket.SHUT_WR)
    incoming = receive_from(ours, ENDPOINT, lambda info: CaptureConsole())
    with incoming.machine as machine:
        assert [d.kind for d in machine.config.devices] == ["virtio-rng"]
    assert json.loads(theirs.recv(100)) == ACCEPTED
    ours.close()
    theirs.close()


def test_an_unknown_optional_section_before_info_is_skipped(migration_stream: bytes) -> None:
    sections = sections_of(migration_stream)
    ours, theirs = socket.socketpair()
    sender = threading.Thread(
        target=theirs.sendall, args=(stream([sections[0], (99, 1, b"new"), *sections[1:]]),)
    )
    sender.start()
    incoming = receive_from(ours, ENDPOINT, lambda info: CaptureConsole())
    incoming.machine.close()
    sender.join(30)
    assert json.loads(theirs.recv(100)) == ACCEPTED
    ours.close()
    theirs.close()


@FUZZ
@given(st.data())
def test_a_cut_stream_is_refused(migration_stream: bytes, data: st.DataObject) -> None:
    cut = migration_stream[: data.draw(st.integers(0, len(migration_stream) - 1))]
    assert_refused(take(cut), DAMAGED)


@FUZZ
@given(st.data())
def test_a_bit_flipped_stream_is_refused(migration_stream: bytes, data: st.DataObject) -> None:
    damaged = bytearray(migration_stream)
    for _ in range(data.draw(st.integers(1, 8))):
        bit = data.draw(st.integers(0, len(damaged) * 8 - 1))
        damaged[bit // 8] ^= 1 << (bit % 8)
    if damaged == migration_stream:  # (the same bit flipped back)
        take(bytes(damaged)).close()  # type: ignore[union-attr]
    else:
        assert_refused(take(bytes(damaged)), DAMAGED)


RAM_END = 64 << 20  # the recorded machine's RAM: one region from 0


def in_ram(gpa: int, size: int) -> bool:
    return gpa % 4096 == 0 and size > 0 and size % 4096 == 0 and gpa + size <= RAM_END


@FUZZ
@given(st.data())
def test_pages_aimed_anywhere_are_refused_or_land_in_ram(
    migration_stream: bytes, data: st.DataObject
) -> None:
    """Valid checksums around a page batch whose address and length a hostile source chose,
    after the stream's last pages: outside RAM, across RAM's end, unaligned, empty, over a
    section's 4 MiB or with a run table that does not add up: refused; whole pages in RAM:
    written there."""
    sections = sections_of(migration_stream)
    last_pages = max(i for i, (kind, _, _) in enumerate(sections) if kind in PAGE_SECTIONS)
    page = st.integers(0, (80 << 20) // 4096).map(lambda n: n * 4096)  # in RAM, or just past
    gpa = data.draw(
        st.one_of(
            page, page, st.integers(0, 2**52 - 1).map(lambda n: n * 4096), st.integers(0, 2**64 - 1)
        )
    )
    size = data.draw(st.sampled_from([0, 1, 4096, 8192, 4 << 20, (4 << 20) + 4096]))
    kind = data.draw(st.sampled_from(PAGE_SECTIONS))
    pattern = (b"hostile!" * (size // 8 + 1))[:size]
    writes = [(gpa, pattern)]
    if kind == SectionType.PAGES:
        payload = struct.pack("<Q", gpa) + pattern
        fits = in_ram(gpa, size) and size <= CHUNK
    elif kind == SectionType.ZERO_PAGES:
        length = data.draw(st.sampled_from([size, 2**64 - 1]))
        payload = struct.pack("<QQ", gpa, length)
        writes = [(gpa, bytes(size))]
        fits = in_ram(gpa, size) and length == size <= CHUNK
    else:  # runs: the hostile one among good ones, counts and lengths that may not agree
        runs = [(4096, 1, b"run one!" * 512), (gpa, size // 4096, pattern[: size // 4096 * 4096])]
        runs.append((1 << 20, 2, b"run two!" * 1024))
        count = data.draw(st.sampled_from([len(runs), 0, 2**32 - 1]))
        extra = data.draw(st.sampled_from([0, -4096, 4096, 1]))
        table = b"".join(struct.pack("<QI", at, n) for at, n, _ in runs)
        pages = b"".join(run for _, _, run in runs)
        payload = (
            struct.pack("<I", count) + table + (pages + bytes(max(extra, 0)))[: len(pages) + extra]
        )
        writes = [(at, run) for at, _, run in runs]
        total = sum(len(run) for _, _, run in runs)
        fits = count == len(runs) and extra == 0 and in_ram(gpa, size // 4096 * 4096)
        fits = fits and total <= CHUNK
    sections.insert(last_pages + 1, (kind, 0, payload))
    event("written to RAM" if fits else "refused")
    outcome = take(stream(sections))
    if not fits:
        assert_refused(outcome, r"is malformed|has pages outside RAM")
        return
    assert isinstance(outcome, Machine), f"refused pages that fit in RAM: {outcome}"
    with outcome as machine:
        for at, expected in writes:
            assert machine.memory.read(at, len(expected)) == expected


def test_a_dirty_round_sends_page_runs(migration_stream: bytes) -> None:
    """The rounds after the first send the counter guest's scattered pages many to a section."""
    assert SectionType.PAGE_RUNS in [kind for kind, _, _ in sections_of(migration_stream)]


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_are_refused(junk: bytes) -> None:
    assert_refused(take(junk), DAMAGED)
