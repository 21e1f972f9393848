"""Post-copy migration against the host's /dev/kvm and userfaultfd: a guest that rewrites 16 MiB
all the time never fits a pre-copy's downtime, and migrates with post-copy: its vCPU's faults
(inside KVM_RUN) and pyvmm's own reads of RAM that has not arrived wait for the page, every
page arrives as it was, and the guest counts on; a source lost during post-copy stops the
destination with the reason instead of leaving it hung or running on missing pages."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from counting import counts_of_passes
from guestbuild import guest, requires_kvm
from processes import pyvmm, start_destination

from pyvmm.board.machine import Machine, RunState, StopReason
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.machine.console import CaptureConsole
from pyvmm.machine.dirty import DirtyBitmap
from pyvmm.machine.memory import GuestMemory, RamRegion
from pyvmm.migration import postcopy, snapshot
from pyvmm.migration.destination import Incoming, receive
from pyvmm.migration.source import Migration
from pyvmm.migration.transport import Endpoint, MigrationError

REGION, REGION_END = 32 << 20, 48 << 20  # what memtouch rewrites, a quadword a page
STILL = (48 << 20, 56 << 20)  # data the guest never touches


def fill_with_data(machine: Machine) -> dict[int, bytes]:
    """Random bytes in each page of memtouch's region past its first quadword, and in STILL:
    what must arrive unchanged. Returns {gpa: page}."""
    pages = {}
    for gpa in [*range(REGION, REGION_END, PAGE_SIZE), *range(*STILL, PAGE_SIZE)]:
        page = os.urandom(PAGE_SIZE)
        machine.memory.write(gpa, page)
        pages[gpa] = page
    return pages


def slow_push(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The source's push of the rest, slowed, so that the guest's faults come first."""
    take_next = postcopy.Pending.take_next

    def slowly(self: postcopy.Pending, max_pages: int) -> tuple[int, int] | None:
        time.sleep(seconds)
        return take_next(self, max_pages)

    monkeypatch.setattr(postcopy.Pending, "take_next", slowly)


def migrate(
    source: Machine, uri: str, during_postcopy, **options: object
) -> tuple[Incoming | None, Migration, BaseException | None]:
    """Migrate `source` to a destination thread in this process, which calls
    `during_postcopy(incoming, migration)` once it has confirmed; returns what came in, the
    migration, and what its run raised."""
    arrived: list[Incoming] = []
    ready = threading.Event()
    migration = Migration(source, Endpoint.parse(uri), info={}, **options)  # type: ignore[arg-type]

    def destination() -> None:
        incoming = receive(
            Endpoint.parse(uri), lambda info: CaptureConsole(), on_listening=ready.set
        )
        arrived.append(incoming)
        incoming.start()
        incoming.report_running()
        during_postcopy(incoming, migration)

    thread = threading.Thread(target=destination)
    thread.start()
    assert ready.wait(30)
    failure = None
    try:
        migration.run()
    except MigrationError as err:
        failure = err
    thread.join(60)
    return (arrived[0] if arrived else None), migration, failure


@contextlib.contextmanager
def running_memtouch() -> Iterator[Machine]:
    """A source machine running memtouch, past its first pass."""
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("memtouch")))
        source.start()
        source.console.wait_for(r"pass 1\n", 30)  # type: ignore[attr-defined]
        yield source


def postcopy_of(
    source: Machine, tmp_path: Path, during_postcopy
) -> tuple[Incoming | None, Migration, BaseException | None]:
    """`migrate` with a downtime limit memtouch never fits: it switches to post-copy."""
    uri = f"unix:{tmp_path / 'in.sock'}"
    return migrate(source, uri, during_postcopy, downtime_limit=0.0001, postcopy=True)


@requires_kvm
@pytest.mark.kvm
def test_a_guest_that_never_converges_migrates_with_postcopy_every_page_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_push(monkeypatch, 0.002)
    read_during: list[tuple[bool, bytes]] = []
    last_page = REGION_END - PAGE_SIZE

    def during_postcopy(incoming: Incoming, _: Migration) -> None:
        # pyvmm's own read of a page that may not be here yet waits for it (a Python thread
        # touching it unasked would fault holding the GIL the fault's server needs)
        missing = bool(incoming.machine.memory.missing)
        read_during.append((missing, incoming.machine.memory.read(last_page, PAGE_SIZE)))

    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("memtouch")))
        data = fill_with_data(source)
        source.start()
        source.console.wait_for(r"pass 2\n", 30)  # type: ignore[attr-defined]
        uri = f"unix:{tmp_path / 'in.sock'}"
        incoming, migration, failure = migrate(
            source, uri, during_postcopy, downtime_limit=0.0001, postcopy=True
        )
        assert failure is None and incoming is not None
        progress = migration.progress
        with incoming.machine as copy:
            assert source.wait(10).detail == f"migrated to {uri}"
            assert progress.status == "completed" and progress.postcopy, progress
            assert progress.postcopy_pages >= (REGION_END - REGION) // PAGE_SIZE // 2
            assert progress.postcopy_requested_pages > 0  # the vCPU's faults asked
            assert copy.memory.missing == "" and copy.memory.before_access is None
            ((missing_then, page_then),) = read_during
            assert missing_then
            assert page_then[8:] == data[last_page][8:]
            # every page as the source left it: the data, and each page's count no older
            for gpa, page in data.items():
                now, then = copy.memory.read(gpa, PAGE_SIZE), source.memory.read(gpa, PAGE_SIZE)
                assert now[8:] == page[8:], hex(gpa)
                if gpa < REGION_END:
                    assert int.from_bytes(now[:8], "little") >= int.from_bytes(then[:8], "little")
                else:
                    assert now == then
            last = counts_of_passes(source.console.text)[-1]  # type: ignore[attr-defined]
            copy.console.wait_for(rf"pass {last + 2}\n", 30)  # type: ignore[attr-defined]
            # the console across the switch (which may fall inside a line) counts on, no pass
            # lost or repeated
            across = counts_of_passes(source.console.text + copy.console.text)  # type: ignore[attr-defined]
            assert across == list(range(1, across[-1] + 1))
            copy.stop()
            copy.wait()


@requires_kvm
@pytest.mark.kvm
def test_a_source_lost_during_postcopy_stops_the_destination_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source dies part-way through the push: the destination's guest, waiting in KVM for
    a page that will never come, is not left hanging; the machine stops with an error that
    says it is lost, and the source's own error says so too."""
    slow_push(monkeypatch, 0.02)
    ended: list[object] = []

    def during_postcopy(incoming: Incoming, migration: Migration) -> None:
        time.sleep(0.2)
        migration.cancel()  # as a source going away: its connection shut down
        ended.append(incoming.machine.wait(30))

    with running_memtouch() as source:
        incoming, _, failure = postcopy_of(source, tmp_path, during_postcopy)
        assert incoming is not None
        with incoming.machine:
            (result,) = ended
            assert result.reason is StopReason.ERROR, result  # type: ignore[attr-defined]
            assert re.match(
                r"post-copy migration: the source is lost with \d+ KiB of RAM not sent \(.*\): "
                r"this machine cannot run on without it$",
                result.detail,  # type: ignore[attr-defined]
            ), result
        assert isinstance(failure, MigrationError)
        assert "post-copy was under way" in str(failure) and "the machine is lost" in str(failure)
        assert source.state is RunState.PAUSED  # older than what the destination ran
        source.stop()


@requires_kvm
@pytest.mark.kvm
def test_pyvmm_migrate_postcopy_between_two_processes(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    console = tmp_path / "console.txt"
    proc = subprocess.Popen(
        [
            "python3", "-m", "pyvmm", "run", str(guest("memtouch")), "-m", "64M",
            "--control", str(control), "--console", f"file:{console}",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    uri = f"unix:{tmp_path / 'in.sock'}"
    destination = start_destination(uri)
    try:
        deadline = time.monotonic() + 30
        while "pass 2" not in (console.read_text() if console.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        done = pyvmm("migrate", str(control), uri, "--downtime", "1", "--postcopy")
        assert done.returncode == 0, done.stderr
        assert re.search(
            r"; post-copy: \d+ KiB after the switch, \d+ pages asked for by faults, all in "
            r"after \d+ ms$",
            done.stdout.strip(),
        ), done.stdout
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and err == f"pyvmm: stopped: migrated to {uri}\n"
        last = counts_of_passes(console.read_text())[-1]
        deadline = time.monotonic() + 30
        while counts_of_passes(console.read_text())[-1] < last + 2:  # the destination appends
            assert time.monotonic() < deadline, console.read_text()[-300:]
            time.sleep(0.05)
    finally:
        proc.kill()
        destination.kill()
        destination.wait()


# the bookkeeping, without KVM


def bitmap_of(gpa: int, pages: int, dirty: list[int]) -> DirtyBitmap:
    bits = sum(1 << page for page in dirty)
    size = (pages + 7) // 8
    return DirtyBitmap(gpa, pages, bits.to_bytes(size, "little"), bytes(size))


def test_pending_pages_go_once_requests_first_then_on_from_there() -> None:
    low, high = bitmap_of(0, 16, [1, 2, 3, 9, 10]), bitmap_of(1 << 20, 8, [0, 7])
    pending = postcopy.Pending([high, low])
    assert pending.left == 7
    assert pending.take_requested(9 * PAGE_SIZE, 4) == [(9 * PAGE_SIZE, 2 * PAGE_SIZE)]
    assert pending.take_next(64) == (1 << 20, PAGE_SIZE)  # on from the request's end
    assert pending.take_next(64) == ((1 << 20) + 7 * PAGE_SIZE, PAGE_SIZE)
    assert pending.take_next(2) == (PAGE_SIZE, 2 * PAGE_SIZE)  # wrapped round; at most 2
    assert pending.take_requested(PAGE_SIZE, 3) == [(3 * PAGE_SIZE, PAGE_SIZE)]
    assert pending.take_requested(PAGE_SIZE, 3) == []  # sent already
    assert pending.take_requested(5 << 30, 1) == []  # not RAM: nothing
    assert pending.left == 0 and pending.take_next(64) is None


def test_a_push_batch_gathers_scattered_runs_up_to_its_pages() -> None:
    pending = postcopy.Pending([bitmap_of(0, 16, [1, 3, 4, 5, 9, 10, 11, 12, 15])])
    assert pending.take_batch(6) == [
        (PAGE_SIZE, PAGE_SIZE),
        (3 * PAGE_SIZE, 3 * PAGE_SIZE),
        (9 * PAGE_SIZE, 2 * PAGE_SIZE),  # cut at the batch's pages; the rest comes next
    ]
    assert pending.take_batch(6) == [(11 * PAGE_SIZE, 2 * PAGE_SIZE), (15 * PAGE_SIZE, PAGE_SIZE)]
    assert pending.left == 0 and pending.take_batch(6) == []


def test_a_postcopy_section_names_each_region_once_with_its_size() -> None:
    memory = GuestMemory()
    memory.add(RamRegion(0, 64 * PAGE_SIZE))
    memory.add(RamRegion(1 << 20, 16 * PAGE_SIZE))
    memory.add(RamRegion(2 << 20, 9 * PAGE_SIZE))  # its bitmap's last byte has 7 spare bits
    try:
        bitmaps = [
            bitmap_of(0, 64, [0, 63]),
            bitmap_of(1 << 20, 16, [5]),
            bitmap_of(2 << 20, 9, [8]),
        ]
        payload = postcopy.encode_pending(bitmaps)
        assert postcopy.decode_pending(payload, memory) == {b.gpa: b.bitmap for b in bitmaps}
        wrong = [
            (payload[:-1], "cut short"),
            (payload[:20], "cut short"),
            (postcopy.encode_pending([bitmap_of(0, 32, [1])]), "names no RAM region"),
            (postcopy.encode_pending([bitmap_of(4096, 64, [1])]), "names no RAM region"),
            (postcopy.encode_pending(bitmaps[:1] * 2), "names no RAM region"),
            (  # pages 9 to 15 of a 9-page region: past its end (MADV_REMOVE would reach there)
                postcopy.encode_pending([bitmap_of(2 << 20, 9, [8])])[:-1] + b"\x03",
                "marks pages past the region's end",
            ),
        ]
        for bad, why in wrong:
            with pytest.raises(postcopy.PostcopyError, match=why):
                postcopy.decode_pending(bad, memory)
    finally:
        memory.close()


def test_a_machine_still_receiving_its_ram_is_not_snapshotted_or_migrated(tmp_path: Path) -> None:
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as machine:
        machine.memory.missing = "a post-copy migration is still bringing 4 KiB of its RAM in"
        with pytest.raises(snapshot.SnapshotError, match=r"^cannot snapshot this machine yet: a "):
            snapshot.write(machine, tmp_path / "snap", {})
        migration = Migration(machine, Endpoint.parse(f"unix:{tmp_path / 'x'}"), info={})
        with pytest.raises(MigrationError, match=r"cannot migrate this machine: its RAM: a post"):
            migration.run()


def test_the_destination_asks_for_each_page_once_and_pyvmm_reads_wait_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Destination, on a memfd region of its own (no machine): a read through GuestMemory of
    awaited pages asks for them and waits; a wider read asks only for what was not asked
    before; the pages that come are what reads see; a wait says it still waits."""
    monkeypatch.setattr(postcopy.Destination, "KEEPALIVE", 0.05)
    memory = GuestMemory()
    memory.add(RamRegion(0, 16 * PAGE_SIZE))
    memory.write(0, b"\xaa" * 16 * PAGE_SIZE)  # pre-copy's: pages 0-7 are dropped again
    sent: list[dict[str, object]] = []
    failures: list[str] = []
    destination = postcopy.Destination(
        memory, {0: bitmap_of(0, 16, list(range(8))).bitmap}, sent.append, failures.append
    )
    try:
        destination.start()
        reads: dict[str, bytes] = {}

        def read(name: str, gpa: int, size: int) -> None:
            reads[name] = memory.read(gpa, size)

        first = threading.Thread(target=read, args=("one", 0, PAGE_SIZE))
        first.start()
        wait_until(lambda: {"pages": [[0, 1]]} in sent)
        wider = threading.Thread(target=read, args=("eight", 0, 8 * PAGE_SIZE))
        wider.start()
        wait_until(lambda: {"pages": [[PAGE_SIZE, 7]]} in sent)
        assert reads == {}  # both wait
        wait_until(lambda: {"awaiting": 8} in sent)
        assert memory.read(8 * PAGE_SIZE, PAGE_SIZE) == b"\xaa" * PAGE_SIZE  # not dropped
        pages = os.urandom(8 * PAGE_SIZE)
        runs = [(0, pages[:PAGE_SIZE]), (PAGE_SIZE, pages[PAGE_SIZE:]), (0, bytes(PAGE_SIZE))]
        destination.fill(runs)  # a section of runs, one of them twice: taken the first time
        first.join(10)
        wider.join(10)
        assert reads == {"one": pages[:PAGE_SIZE], "eight": pages}
        destination.fill([(0, bytes(8 * PAGE_SIZE))])  # again: filled pages keep what they have
        assert memory.read(0, 8 * PAGE_SIZE) == pages
        assert destination.requested_pages == 8 and destination.awaited == 0
        destination.complete()
        assert memory.before_access is None and memory.missing == ""
        assert failures == []
    finally:
        memory.close()


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@requires_kvm
@pytest.mark.kvm
def test_a_destination_that_cannot_take_postcopy_in_leaves_the_source_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination fails to set post-copy up (here: registering its RAM): it never ran the
    machine and says so, and the source runs on."""

    def cannot(self: postcopy.Destination, *args: object) -> None:
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(postcopy.Destination, "__init__", cannot)
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("memtouch")))
        source.start()
        source.console.wait_for(r"pass 1\n", 30)  # type: ignore[attr-defined]
        uri = f"unix:{tmp_path / 'in.sock'}"
        refused: list[str] = []
        ready = threading.Event()

        def destination() -> None:
            try:
                receive(Endpoint.parse(uri), lambda info: CaptureConsole(), on_listening=ready.set)
            except MigrationError as err:
                refused.append(str(err))

        thread = threading.Thread(target=destination)
        thread.start()
        assert ready.wait(30)
        migration = Migration(
            source, Endpoint.parse(uri), info={}, downtime_limit=0.0001, postcopy=True
        )
        with pytest.raises(MigrationError, match=r"refused: cannot take the post-copy in: "):
            migration.run()
        thread.join(30)
        assert refused == ["cannot take the post-copy in: [Errno 16] Device or resource busy"]
        assert source.state is RunState.RUNNING
        passes = counts_of_passes(source.console.text)[-1]  # type: ignore[attr-defined]
        source.console.wait_for(rf"pass {passes + 1}\n", 30)  # type: ignore[attr-defined]
        source.stop()


@requires_kvm
@pytest.mark.kvm
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_destination_that_quits_during_postcopy_ends_cleanly_and_the_source_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination's user quits while pages still come: its machine ends and closes
    without waiting for them (no thread of it fails on the closed machine), and the source,
    cut off mid-push, says the machine is lost."""
    slow_push(monkeypatch, 0.02)
    closed: list[bool] = []

    def during_postcopy(incoming: Incoming, _: Migration) -> None:
        time.sleep(0.2)
        incoming.machine.stop()
        incoming.machine.wait(30)
        incoming.machine.close()
        closed.append(True)

    with running_memtouch() as source:
        _, migration, failure = postcopy_of(source, tmp_path, during_postcopy)
        assert closed == [True]
        assert isinstance(failure, MigrationError), migration.progress
        assert re.search(r"post-copy was under way, \d+ KiB of RAM not yet sent", str(failure))
        assert source.state is RunState.PAUSED
        source.stop()
