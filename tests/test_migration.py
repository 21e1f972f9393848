"""Live migration against the host's /dev/kvm: between two pyvmm processes over unix and tcp
sockets, the counter guest's count goes on exactly once; a guest that dirties its RAM all the
time arrives with every page; a refusing destination, a cut connection and a guest that never
converges each leave the source running, with a one-line reason."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from counting import assert_consecutive, counts, counts_of_passes, digest
from guestbuild import guest, requires_kvm
from processes import pyvmm, start_counter, start_destination

from pyvmm.board.machine import Machine, RunState, StopReason
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.machine.console import CaptureConsole
from pyvmm.machine.memory import GuestMemory
from pyvmm.machine.state import StateError
from pyvmm.migration.destination import receive
from pyvmm.migration.progress import Progress
from pyvmm.migration.source import DRAINED, Migration
from pyvmm.migration.stream import StreamReader
from pyvmm.migration.transport import RECEIVE_BUFFER, Endpoint, MigrationError
from pyvmm.uapi.ioctl import IoctlError

pytestmark = [pytest.mark.kvm, requires_kvm]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_counts(console: Path, how_many: int) -> None:
    deadline = time.monotonic() + 30
    while len(counts(console.read_text())) < how_many:
        assert time.monotonic() < deadline, console.read_text()
        time.sleep(0.02)


def assert_downtime_phases(line: str) -> None:
    """`pyvmm migrate`'s line says where the downtime went, the destination's part split by its
    own account, and the parts add up to the downtime."""
    found = re.search(r"downtime ([\d.]+) ms \((.*)\)$", line.strip())
    assert found, line
    phases = dict(part.rsplit(" ", 1) for part in found.group(2).split(", "))
    assert list(phases) == [
        "pause",
        "last_pages",
        "state",
        "destination_reading",
        "destination_restore",
        "destination_start",
    ]
    assert sum(map(float, phases.values())) == pytest.approx(float(found.group(1)), abs=0.5)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_the_count_goes_on_exactly_once_on_the_destination(tmp_path: Path, transport: str) -> None:
    """Source and destination print into the same console file (the destination takes the
    source's --console): the count in it runs on with no line lost or repeated."""
    uri = f"unix:{tmp_path / 'in.sock'}" if transport == "unix" else f"tcp:127.0.0.1:{free_port()}"
    control, console = tmp_path / "vm.sock", tmp_path / "console.txt"
    destination = start_destination(uri, "--timeout", "2")
    source = start_counter(control, "--console", f"file:{console}")
    try:
        wait_for_counts(console, 3)
        migrated = pyvmm("migrate", str(control), uri)
        assert migrated.returncode == 0, migrated.stderr
        assert migrated.stdout.startswith(f"pyvmm: migrated to {uri} in ")
        assert_downtime_phases(migrated.stdout)
        _, source_err = source.communicate(timeout=30)
        at_migration = counts(console.read_text())[-1]
        dest_out, dest_err = destination.communicate(timeout=30)
    finally:
        source.kill()
        destination.kill()
    assert source.returncode == 0 and source_err == f"pyvmm: stopped: migrated to {uri}\n"
    assert destination.returncode == 124, dest_err
    assert dest_out == ""  # the console is the source's file
    after = counts(console.read_text())
    assert after[-1] > at_migration
    assert_consecutive(after)


def test_a_tcp_migration_connection_is_set_for_the_downtime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over TCP, both ends' small writes go at once (TCP_NODELAY: the last sections in the
    downtime, a post-copy fault's request line), and the destination's receive buffer is the
    bounded one, not what Linux's autotuning would grow (what it holds unread when the source
    pauses is read in the downtime)."""
    endpoint = Endpoint.parse(f"tcp:127.0.0.1:{free_port()}")
    accepted: dict[str, int] = {}

    def receive_from(sock: socket.socket, *_: object, **__: object) -> None:
        accepted["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        accepted["rcvbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        raise MigrationError("(the test ends here)")

    monkeypatch.setattr("pyvmm.migration.destination.receive_from", receive_from)
    listening = threading.Event()
    refused: list[str] = []

    def destination_side() -> None:
        try:
            receive(endpoint, lambda info: CaptureConsole(), on_listening=listening.set)
        except MigrationError as err:
            refused.append(str(err))

    destination = threading.Thread(target=destination_side)
    destination.start()
    assert listening.wait(10)
    with endpoint.connect(10) as source:
        assert source.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        source.sendall(b"x")  # (the destination takes the first connection that speaks)
        destination.join(10)
    with socket.socket() as untuned, socket.socket() as bounded:
        bounded.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        expected = bounded.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # (Linux doubles it)
        default = untuned.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert refused == ["(the test ends here)"]
    assert accepted == {"nodelay": 1, "rcvbuf": expected} and expected != default


def socket_mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None


def test_the_incoming_socket_replaces_a_stale_one_and_is_the_users_alone(tmp_path: Path) -> None:
    path = tmp_path / "in.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening, closed: what a killed pyvmm leaves
    stale.close()
    os.chmod(path, 0o644)  # whatever the umask: the loop below waits for the new one's 0600
    destination = start_destination(f"unix:{path}")
    try:
        deadline = time.monotonic() + 30
        while socket_mode(path) != 0o600:  # (gone for a moment: the stale one is replaced)
            assert destination.poll() is None, destination.communicate()
            assert time.monotonic() < deadline, socket_mode(path)
            time.sleep(0.02)
        busy = start_destination(f"unix:{path}")
        _, err = busy.communicate(timeout=30)
        assert busy.returncode == 1
        assert err == f"pyvmm: error: --incoming unix:{path}: another process is listening there\n"
        time.sleep(0.5)
        assert destination.poll() is None and path.exists()  # the probe did not end the wait
    finally:
        destination.kill()
        destination.wait()
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("x")
    refused = start_destination(f"unix:{tmp_path / 'other.sock'}", "--control", str(not_a_socket))
    _, err = refused.communicate(timeout=30)
    assert refused.returncode == 1  # before it takes a machine in that it could not serve
    assert err == f"pyvmm: error: --control {not_a_socket}: a file that is not a socket is there\n"
    assert not (tmp_path / "other.sock").exists()


ZERO_PAGE = bytes(PAGE_SIZE)
destination_errors: list[str] = []


def migrate_in_process(
    source: Machine, uri: str, **options: object
) -> tuple[Machine, str, Progress]:
    """Migrate `source` (running) to a destination in this process, which records a digest of
    its RAM before it starts; returns the destination's machine (running), that digest and
    the migration's progress."""
    arrived: list[tuple[Machine, str]] = []
    ready = threading.Event()

    def destination() -> None:
        try:
            incoming = receive(
                Endpoint.parse(uri), lambda info: CaptureConsole(), on_listening=ready.set
            )
        except MigrationError as err:
            destination_errors.append(str(err))
            return
        arrived.append((incoming.machine, digest(incoming.machine)))
        incoming.start()
        incoming.report_running()

    thread = threading.Thread(target=destination)
    thread.start()
    assert ready.wait(30)
    migration = Migration(source, Endpoint.parse(uri), info={}, **options)  # type: ignore[arg-type]
    try:
        migration.run()
    finally:
        thread.join(60)
    return (*arrived[0], migration.progress)


def test_a_guest_dirtying_its_ram_arrives_with_every_page(tmp_path: Path) -> None:
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("memtouch")))
        source.add_device("virtio-rng")
        source.start()
        source.console.wait_for(r"pass 3\n", 30)  # type: ignore[attr-defined]
        uri = f"unix:{tmp_path / 'in.sock'}"
        copy, arrived, _ = migrate_in_process(source, uri, downtime_limit=0.2)
        with copy:
            assert source.wait(10).detail == f"migrated to {uri}"
            assert arrived == digest(source)  # RAM as the source left it, every page
            last = counts_of_passes(source.console.text)[-1]  # type: ignore[attr-defined]
            copy.console.wait_for(rf"pass {last + 2}\n", 30)  # type: ignore[attr-defined]
            copy.stop()
            copy.wait()


def test_the_destination_pre_faults_every_page_that_arrives_before_the_guest_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each page a round sends is offered to `Machine.pre_fault` once (KVM maps it, where it
    can: tests/lab/test_lab_pre_fault.py; this host's KVM cannot, so the KVM side is stood in
    for), while the destination's vCPUs are still out of the guest. Chunks of zeros are not
    offered (a page of zeros is cold), nor is a page again when a later round sends it again."""
    offered: list[int] = []

    def pre_fault(machine: Machine, gpa: int, size: int) -> bool:
        assert machine.state is not RunState.RUNNING
        offered.extend(range(gpa, gpa + size, PAGE_SIZE))
        return True

    monkeypatch.setattr(Machine, "can_pre_fault", property(lambda machine: True))
    monkeypatch.setattr(Machine, "pre_fault", pre_fault)
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("memtouch")))
        source.start()
        source.console.wait_for(r"pass 2\n", 30)  # type: ignore[attr-defined]
        uri = f"unix:{tmp_path / 'in.sock'}"
        copy, _, _ = migrate_in_process(source, uri, downtime_limit=0.5, auto_converge=True)
        with copy:
            copy.stop()
            copy.wait()
        source.wait(10)
        holding_data = {  # the source's RAM as it was sent
            region.gpa + at
            for region in source.memory.regions
            for at in range(0, region.size, PAGE_SIZE)
            if region.view[at : at + PAGE_SIZE] != ZERO_PAGE
        }
    assert len(offered) == len(set(offered))
    assert holding_data and holding_data <= set(offered)
    assert len(offered) < (64 << 20) // PAGE_SIZE  # not all of RAM: memtouch leaves zeros


def test_a_guest_that_never_converges_fails_clearly_and_runs_on(tmp_path: Path) -> None:
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("memtouch")))
        source.start()
        source.console.wait_for(r"pass 1\n", 30)  # type: ignore[attr-defined]
        with pytest.raises(MigrationError, match=r"dirties memory about as fast as it can be sent"):
            migrate_in_process(
                source, f"unix:{tmp_path / 'in.sock'}", downtime_limit=0.0001, max_rounds=3
            )
        assert source.state is RunState.RUNNING
        assert not source.dirty.active
        assert "is truncated" in destination_errors.pop()  # the source went away
        passes = counts_of_passes(source.console.text)[-1]  # type: ignore[attr-defined]
        source.console.wait_for(rf"pass {passes + 2}\n", 30)  # type: ignore[attr-defined]
        source.stop()
        assert source.wait().reason is StopReason.STOPPED


def test_auto_converge_throttles_a_guest_that_never_converges_until_it_does(
    tmp_path: Path,
) -> None:
    """memtouch rewrites 16 MiB all the time: 1 ms of downtime never fits it (the test above),
    unless auto-converge throttles it. It arrives with every page, and runs on unthrottled."""
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("memtouch")))
        source.start()
        source.console.wait_for(r"pass 1\n", 30)  # type: ignore[attr-defined]
        uri = f"unix:{tmp_path / 'in.sock'}"
        copy, arrived, progress = migrate_in_process(
            source, uri, downtime_limit=0.001, auto_converge=True
        )
        with copy:
            assert source.wait(10).detail == f"migrated to {uri}"
            assert arrived == digest(source)
            assert 20 <= progress.throttle_percent <= 99, progress
            assert source.throttled_seconds > 0
            assert source.throttle_fraction == 0  # the throttle ended with the migration
            last = counts_of_passes(source.console.text)[-1]  # type: ignore[attr-defined]
            copy.console.wait_for(rf"pass {last + 2}\n", 30)  # type: ignore[attr-defined]
            copy.stop()
            copy.wait()


def test_a_source_whose_state_cannot_be_saved_runs_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saving the components, in the downtime, fails (a kernel that refuses a vCPU's state):
    the migration fails with the reason, and the source, paused for it, runs on."""

    def fail(machine: Machine) -> object:
        raise StateError("vcpu0: KVM_GET_MSRS failed: Input/output error")

    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("memtouch")))
        source.start()
        source.console.wait_for(r"pass 1\n", 30)  # type: ignore[attr-defined]
        monkeypatch.setattr(Machine, "save", fail)
        with pytest.raises(MigrationError, match=r"vcpu0: KVM_GET_MSRS failed"):
            migrate_in_process(source, f"unix:{tmp_path / 'in.sock'}", downtime_limit=0.3)
        assert "is truncated" in destination_errors.pop()  # it never had the state
        assert source.state is RunState.RUNNING and not source.dirty.active
        passes = counts_of_passes(source.console.text)[-1]  # type: ignore[attr-defined]
        source.console.wait_for(rf"pass {passes + 2}\n", 30)  # type: ignore[attr-defined]
        source.stop()
        assert source.wait().reason is StopReason.STOPPED


@pytest.mark.parametrize(
    ("refusal", "said"),
    [
        (StateError("vcpu0: a state this kernel refuses"), "vcpu0: a state this kernel refuses"),
        (
            IoctlError("KVM_SET_MSRS", errno.EINVAL),
            "restoring the machine failed: KVM_SET_MSRS failed: Invalid argument (errno 22)",
        ),
    ],
)
def test_a_destination_that_refuses_the_state_it_was_sent_leaves_the_source_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: Exception, said: str
) -> None:
    """Once the state has gone across, a source hearing nothing stays paused (the destination
    may run it), but one told that the state was refused (by pyvmm's checks, or by the kernel)
    knows it does not, and runs on."""

    def refuse(machine: Machine, saved: object) -> None:
        raise refusal

    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("counter")))
        source.start()
        source.console.wait_for(r"count", 30)  # type: ignore[attr-defined]
        monkeypatch.setattr(Machine, "restore", refuse)  # the destination's (the source's
        # machine restores nothing)
        with pytest.raises(MigrationError, match=rf"^the destination refused: {re.escape(said)}"):
            migrate_in_process(source, f"unix:{tmp_path / 'in.sock'}", downtime_limit=0.3)
        assert destination_errors.pop() == said
        assert source.state is RunState.RUNNING
        source.stop()
        assert source.wait().reason is StopReason.STOPPED


def test_a_destination_that_refuses_leaves_the_source_running(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path / 'in.sock'}"
    control = tmp_path / "vm.sock"
    destination = start_destination(uri, "-m", "128M")
    source = start_counter(control)
    try:
        refused = pyvmm("migrate", str(control), uri)
        assert refused.returncode == 1
        assert refused.stderr.endswith(
            "pyvmm: error: migration failed: the destination refused: it has 64 MiB of RAM, not "
            "128 MiB\n"
        )
        _, dest_err = destination.communicate(timeout=30)
        assert destination.returncode == 1
        assert dest_err == (
            "pyvmm: error: refused the incoming machine: it has 64 MiB of RAM, not 128 MiB\n"
        )
        assert json.loads(pyvmm("ctl", str(control), "status").stdout)["status"] == "running"
        assert pyvmm("ctl", str(control), "quit").returncode == 0
        out, _ = source.communicate(timeout=30)
    finally:
        source.kill()
        destination.kill()
    assert_consecutive(counts(out))


def test_a_connection_cut_mid_stream_leaves_the_source_running(tmp_path: Path) -> None:
    """A destination that accepts, takes a few pages and goes away (as a killed one does)."""
    path = tmp_path / "in.sock"
    listener = unix_listener(path)

    def vanishing_destination() -> None:
        conn, _ = listener.accept()
        reader = StreamReader(conn.makefile("rb"))
        reader.next(), reader.next()  # CONFIG, INFO
        conn.sendall(b'{"accept": true}\n')
        reader.next()  # a first batch of pages
        conn.close()

    thread = threading.Thread(target=vanishing_destination)
    thread.start()
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("memtouch")))
        source.start()
        source.console.wait_for(r"pass 1\n", 30)  # type: ignore[attr-defined]
        with pytest.raises(MigrationError, match=r"connection to unix:.* broke|destination closed"):
            Migration(source, Endpoint.parse(f"unix:{path}"), info={}).run()
        thread.join(30)
        listener.close()
        assert source.state is RunState.RUNNING and not source.dirty.active
        passes = counts_of_passes(source.console.text)[-1]  # type: ignore[attr-defined]
        source.console.wait_for(rf"pass {passes + 1}\n", 30)  # type: ignore[attr-defined]
        source.stop()
        source.wait()


def test_a_migration_to_nowhere_is_refused_in_one_line(tmp_path: Path) -> None:
    control = tmp_path / "vm.sock"
    source = start_counter(control)
    try:
        bad = pyvmm("migrate", str(control), "ftp:somewhere")
        assert bad.returncode == 1
        assert bad.stderr == (
            "pyvmm: error: bad migration address 'ftp:somewhere': use unix:PATH or tcp:HOST:PORT\n"
        )
        assert json.loads(pyvmm("ctl", str(control), "status").stdout)["status"] == "running"
        assert pyvmm("ctl", str(control), "quit").returncode == 0
        source.communicate(timeout=30)
    finally:
        source.kill()


def unix_listener(path: Path) -> socket.socket:
    """A stand-in destination's listening socket at `path`."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    return listener


def fake_destination(path: Path, answer_accept: bytes | None) -> threading.Thread:
    """A destination that answers CONFIG+INFO with `answer_accept` (None: never answers) and
    goes away at END without a word."""
    listener = unix_listener(path)

    def serve() -> None:
        conn, _ = listener.accept()
        listener.close()
        with conn:
            reader = StreamReader(conn.makefile("rb"))
            reader.next(), reader.next()
            if answer_accept is None:
                while conn.recv(65536):
                    pass  # reads on, never answers, until the source goes
                return
            conn.sendall(answer_accept)
            if not answer_accept.startswith(b'{"accept"'):
                return
            while reader.next().type != 0:
                pass

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def test_a_paused_source_stays_paused_after_a_refusal(tmp_path: Path) -> None:
    path = tmp_path / "in.sock"
    thread = fake_destination(path, b'{"error": "not today"}\n')
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("counter")))
        source.start()
        assert source.pause()
        with pytest.raises(MigrationError, match="the destination refused: not today"):
            Migration(source, Endpoint.parse(f"unix:{path}"), info={}).run()
        thread.join(30)
        assert source.state is RunState.PAUSED  # as the user left it
        source.stop()
        source.wait()


def test_a_source_whose_state_went_across_stays_paused_without_a_confirmation(
    tmp_path: Path,
) -> None:
    """Once the state has been sent, the destination may be running it: a source that hears
    nothing back must not run on as well."""
    path = tmp_path / "in.sock"
    thread = fake_destination(path, b'{"accept": true}\n')
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("counter")))
        source.start()
        source.console.wait_for(r"count 1024\n", 30)  # type: ignore[attr-defined]
        with pytest.raises(MigrationError, match="this copy stays paused"):
            Migration(source, Endpoint.parse(f"unix:{path}"), info={}).run()
        thread.join(30)
        assert source.state is RunState.PAUSED
        source.stop()
        source.wait()


def test_control_refuses_pauses_and_snapshots_during_a_migration_and_quit_cancels_it(
    tmp_path: Path,
) -> None:
    path, control = tmp_path / "in.sock", tmp_path / "vm.sock"
    thread = fake_destination(path, None)  # takes the stream, never answers
    source = start_counter(control)
    try:
        assert pyvmm("ctl", str(control), "migrate", f"uri=unix:{path}").returncode == 0
        for command in (["pause"], ["resume"], ["snapshot", f"path={tmp_path / 'snap'}"]):
            refused = pyvmm("ctl", str(control), *command)
            assert refused.returncode == 1
            assert "a migration is under way" in refused.stderr, refused.stderr
        assert pyvmm("ctl", str(control), "quit").returncode == 0
        _, err = source.communicate(timeout=30)  # the migration is cancelled, not waited for
    finally:
        source.kill()
    thread.join(30)
    assert source.returncode == 0, err
    assert not (tmp_path / "snap").exists()


def test_the_switch_over_waits_for_the_destination_to_read_what_the_rounds_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What is still unread in the socket when the source pauses would be read during the
    downtime: the source waits (its guest running) until the destination has read all but
    DRAINED bytes, and a destination that stops reading fails the migration before the pause."""
    monkeypatch.setattr("pyvmm.migration.transport.SEND_TIMEOUT", 0.5)
    machine = SimpleNamespace(memory=GuestMemory(), throttle=lambda fraction: None)
    migration = Migration(machine, Endpoint.parse("unix:/nowhere"), info={})  # type: ignore[arg-type]
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(bytes(2 * DRAINED))
        with pytest.raises(MigrationError, match=r"stopped reading: \d+ KiB .* still unread"):
            migration._drain(ours)
        read: list[int] = []

        def read_later() -> None:
            time.sleep(0.1)
            while sum(read) < 2 * DRAINED:
                read.append(len(theirs.recv(65536)))

        reader = threading.Thread(target=read_later)
        reader.start()
        migration._drain(ours)
        assert sum(read) >= DRAINED  # it returned only once the peer had read
        reader.join()


def test_a_destination_that_refuses_mid_stream_is_heard_not_taken_for_a_broken_link(
    tmp_path: Path,
) -> None:
    """A destination that cannot take what it is sent answers why and stops reading: the
    source's sends fail then, and the answer waiting behind them is the reason it gives."""
    path = tmp_path / "in.sock"
    listener = unix_listener(path)

    def refuses_the_first_pages() -> None:
        conn, _ = listener.accept()
        listener.close()
        with conn:
            reader = StreamReader(conn.makefile("rb"))
            reader.next(), reader.next()
            conn.sendall(b'{"accept": true}\n')
            reader.next()
            conn.sendall(b'{"error": "its pages at 0x1000 are outside RAM"}\n')
            conn.shutdown(socket.SHUT_RDWR)

    thread = threading.Thread(target=refuses_the_first_pages)
    thread.start()
    with Machine(mem_size=64 << 20, console=CaptureConsole()) as source:
        source.load_elf(str(guest("counter")))
        source.start()
        source.console.wait_for(r"count 1024\n", 30)  # type: ignore[attr-defined]
        with pytest.raises(
            MigrationError, match=r"^the destination refused: its pages at 0x1000 are outside RAM$"
        ):
            Migration(source, Endpoint.parse(f"unix:{path}"), info={}).run()
        thread.join(30)
        assert source.state is RunState.RUNNING
        source.stop()
        source.wait()
