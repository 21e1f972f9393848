"""A VM with an mtty mdev saved and restored with the mdev's own state (VFIO device migration):
the mtty-state guest programs the port and leaves a pattern in its FIFO, the VM is snapshotted
(no --allow-device-reset: the device migrates) and restored onto a second mdev, or live-migrated
onto one (source and destination machines in this process, on threads of their own), and the
guest reads back the registers and the pattern, which only the device's saved state can give (a
reset mtty has LCR 0 and an empty FIFO), then takes an interrupt from it. The arcs each side's
devices took are checked in order, on both backends; the live migration runs with the mtty's
own DMA log (its driver has the ops) started, read and stopped around it."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from guestbuild import guest
from lab_passthrough import BACKENDS
from processes import pyvmm, spawn, wait_for_file

from pyvmm.board.machine import Machine, RunState
from pyvmm.machine.console import CaptureConsole
from pyvmm.machine.vcpus import StopReason
from pyvmm.migration import snapshot
from pyvmm.migration.destination import Incoming, receive
from pyvmm.migration.source import Migration
from pyvmm.migration.transport import Endpoint, MigrationError, answer
from pyvmm.uapi.vfio import VfioDeviceState as State
from pyvmm.vfio.migration.device import Journal, MigrationData
from pyvmm.vfio.sysfs import Sysfs

MiB = 1 << 20
MTTY_HEADER = 24  # the device data's header (magic, versions, flags, nr_ports)
GO_ADDR = 0x2000000  # guests/mtty-state.c: the word the guest waits on
REGISTERS = r"lcr 0x[0-9a-f]+ mcr 0x[0-9a-f]+ scr 0x[0-9a-f]+ lsr 0x[0-9a-f]+"

PAUSE = [(State.RUNNING, State.RUNNING_P2P), (State.RUNNING_P2P, State.STOP)]
RESUME = [(State.STOP, State.RUNNING_P2P), (State.RUNNING_P2P, State.RUNNING)]


def build_guests() -> None:
    guest("mtty-state")  # on the host: inside the lab the checkout is read-only


@pytest.fixture
def make_mttys(sysfs: Sysfs) -> Iterator[Callable[[int], list[str]]]:
    """Makes mtty-2 mdevs (their UUIDs), all removed afterwards."""
    made: list[str] = []

    def make(count: int) -> list[str]:
        new = [sysfs.create_mdev("mtty-2") for _ in range(count)]
        made.extend(new)
        return new

    try:
        yield make
    finally:
        for uuid in made:
            sysfs.remove_mdev(uuid)


@pytest.fixture
def mttys(make_mttys: Callable[[int], list[str]]) -> tuple[str, str]:
    """Two mtty-2 mdevs: the source's and the destination's."""
    first, second = make_mttys(2)
    return first, second


def start_programmed(backend: str, *mdevs: str) -> tuple[Machine, str]:
    """A machine with `mdevs` running mtty-state (on the first) up to its wait; the registers
    it programmed."""
    machine = Machine(mem_size=64 * MiB, console=CaptureConsole())
    try:
        for mdev in mdevs:
            machine.add_device("vfio-pci", host=mdev, backend=backend)
        machine.load_elf(str(guest("mtty-state")))
        machine.start()
        console = machine.console
        before = console.wait_for(rf"mtty-state: before ({REGISTERS})\n", 120).group(1)  # type: ignore[attr-defined]
        console.wait_for(r"mtty-state: ready\n", 60)  # type: ignore[attr-defined]
    except BaseException:
        machine.close()
        raise
    return machine, before


def journal(machine: Machine) -> list[tuple[State, State]]:
    return [(start, end) for _, start, end in machine.vfio().migrations.journal]


def finish(machine: Machine, before: str) -> None:
    """Let the restored guest go on (started here, unless it runs); it must find the device
    as it left it."""
    machine.memory.write(GO_ADDR, (1).to_bytes(4, "little"))
    if machine.state is not RunState.RUNNING:
        machine.start()
    ended = machine.wait(timeout=120)
    out = machine.console.text  # type: ignore[attr-defined]
    assert (ended.reason, ended.exit_code) == (StopReason.DEBUG_EXIT, 0), out
    assert f"mtty-state: after {before}\n" in out, out
    assert "mtty-state: fifo 'pyvmm-42'\n" in out, out
    assert out.endswith("mtty-state: looped back z\nmtty-state: done\n"), out


@pytest.mark.lab(before=build_guests)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_mtty_vm_restored_onto_a_second_mdev_finds_the_device_as_it_left_it(
    backend: str, mttys: tuple[str, str], tmp_path: Path
) -> None:
    first, second = mttys
    machine, before = start_programmed(backend, first)
    with machine:
        assert re.match(r"lcr 0x1b mcr 0xb scr 0xa5 lsr 0x1", before)  # (DR: the pattern), before
        assert machine.components.caveats() == {}
        assert machine.pause()
        snapshot.write(machine, tmp_path / "snap", {})  # no --allow-device-reset: it migrates
        machine.resume()  # (the source's device runs again: its state was only read)
        assert journal(machine) == [
            *PAUSE,
            (State.STOP, State.STOP_COPY),
            (State.STOP_COPY, State.STOP),
            *RESUME,
        ]
        machine.stop()

    restored = snapshot.restore(
        snapshot.read(tmp_path / "snap"), CaptureConsole(), hosts={first: second}
    )
    with restored:
        (device,) = restored.config.devices
        assert device.options["host"] == second
        assert journal(restored) == [
            *PAUSE,
            (State.STOP, State.RESUMING),
            (State.RESUMING, State.STOP),
            *RESUME,
        ]
        finish(restored, before)


@contextmanager
def destination(uri: str, hosts: dict[str, str]) -> Iterator[list[Incoming]]:
    """A destination on a thread of its own, listening at `uri` once this yields: the machine
    it took in, started, is in the list it yields (and closed on the way out, also after a
    failure: a destination left holding its mdev would hang the mdev's removal)."""
    arrived: list[Incoming] = []
    listening = threading.Event()

    def take_in() -> None:
        with contextlib.suppress(MigrationError):  # (the source's side says why)
            incoming = receive(
                Endpoint.parse(uri),
                lambda info: CaptureConsole(),
                on_listening=listening.set,
                hosts=hosts,
            )
            arrived.append(incoming)
            incoming.start()
            incoming.report_running()

    thread = threading.Thread(target=take_in)
    thread.start()
    try:
        assert listening.wait(60)
        yield arrived
    finally:
        thread.join(120)
        for incoming in arrived:
            incoming.machine.close()


def migrate(machine: Machine, uri: str) -> Migration:
    migration = Migration(machine, Endpoint.parse(uri), info={})
    with contextlib.suppress(MigrationError):
        migration.run()
    return migration


@pytest.mark.lab(before=build_guests)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_mtty_vm_live_migrated_onto_a_second_mdev_finds_the_device_as_it_left_it(
    backend: str, mttys: tuple[str, str], tmp_path: Path
) -> None:
    first, second = mttys
    uri = f"unix:{tmp_path / 'migration.sock'}"
    machine, before = start_programmed(backend, first)
    with destination(uri, {first: second}) as arrived:
        with machine:
            migrating = machine.vfio().migrations
            assert list(migrating.dma_logs) == [first]  # (mtty's driver has DMA logging)
            progress = migrate(machine, uri).progress
            assert progress.status == "completed", progress.error
            assert not migrating.dma_logs[first].logging  # started with the log, stopped with it
            # saved ahead from the first round (PRE_COPY), stopped on the same data fd, the
            # rest read at the stop; the switch-over waited for the destination's word
            assert journal(machine) == [
                (State.RUNNING, State.PRE_COPY),
                (State.PRE_COPY, State.PRE_COPY_P2P),
                (State.PRE_COPY_P2P, State.STOP_COPY),
                (State.STOP_COPY, State.STOP),
            ]
            assert progress.device_precopy_bytes == MTTY_HEADER  # its initial bytes; no dirty
            assert progress.switchover_ack_ms > 0
            print(
                f"mtty live migration ({backend}): downtime {progress.downtime_ms:.1f} ms, "
                f"phases {progress.downtime_phases_ms}, {progress.device_precopy_bytes} device "
                f"bytes ahead, switch-over acknowledged in {progress.switchover_ack_ms:.1f} ms"
            )
        (incoming,) = arrived
        assert journal(incoming.machine) == [
            *PAUSE,
            (State.STOP, State.RESUMING),  # at the first data sent ahead
            (State.RESUMING, State.STOP),
            *RESUME,
        ]
        finish(incoming.machine, before)


def ordered(entries: Journal, first: State, then: State) -> bool:
    """Whether every device's arc into `first` came before any device's arc into `then`."""
    into = [end for _, _, end in entries]
    return max(i for i, end in enumerate(into) if end is first) < min(
        i for i, end in enumerate(into) if end is then
    )


@pytest.mark.lab(before=build_guests)
def test_two_mttys_stop_and_start_in_p2p_order_on_both_sides(
    make_mttys: Callable[[int], list[str]], tmp_path: Path
) -> None:
    """Every device reaches PRE_COPY_P2P before any reaches STOP_COPY on the source; on the
    destination every device is in RUNNING_P2P before any runs."""
    ours, theirs = make_mttys(2), make_mttys(2)
    uri = f"unix:{tmp_path / 'migration.sock'}"
    machine, before = start_programmed("iommufd", *ours)
    with destination(uri, dict(zip(ours, theirs, strict=True))) as arrived:
        with machine:
            progress = migrate(machine, uri).progress
            assert progress.status == "completed", progress.error
            source = machine.vfio().migrations.journal
        (incoming,) = arrived
        moved = incoming.machine.vfio().migrations.journal
        for entries in (source, moved):
            print("\n".join(f"{name}: {a.name} -> {b.name}" for name, a, b in entries))
        assert {name for name, _, _ in source} == set(ours)
        assert {name for name, _, _ in moved} == set(theirs)
        assert ordered(source, State.PRE_COPY_P2P, State.STOP_COPY)
        assert ordered(moved, State.RUNNING_P2P, State.RUNNING)
        assert [end for _, _, end in moved].count(State.RUNNING) == 2
        finish(incoming.machine, before)


def corrupt_device_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The source's device data flipped on its way out: the magic of mtty's header."""
    read_available = MigrationData.read_available

    def flipped(self: MigrationData) -> bytes:
        data = read_available(self)
        return bytes([data[0] ^ 0xFF]) + data[1:] if data else data

    monkeypatch.setattr(MigrationData, "read_available", flipped)


@pytest.mark.lab(before=build_guests)
def test_a_destination_that_refuses_the_device_data_leaves_the_source_running(
    mttys: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = mttys
    uri = f"unix:{tmp_path / 'migration.sock'}"
    machine, before = start_programmed("iommufd", first)
    with machine:
        corrupt_device_data(monkeypatch)
        with destination(uri, {first: second}) as arrived:
            progress = migrate(machine, uri).progress
        assert arrived == []
        assert progress.status == "failed"
        assert re.search(rf"{second}: the device refused", progress.error), progress.error
        (function,) = [f for f in machine.pci.functions.values() if hasattr(f, "migration")]
        assert function.migration.state is State.RUNNING
        monkeypatch.undo()
        finish(machine, before)  # the source's guest finds its device as it was


@pytest.mark.lab(before=build_guests)
def test_a_destination_that_dies_mid_transfer_leaves_the_source_running(
    mttys: tuple[str, str], tmp_path: Path
) -> None:
    first, _ = mttys
    endpoint = Endpoint.parse(f"unix:{tmp_path / 'migration.sock'}")
    listening = threading.Event()

    def dies() -> None:
        sock = endpoint.accept_source(listening.set)
        with sock:
            answer(sock, {"accept": True})
            sock.recv(4096)  # some of round 0, then gone

    machine, before = start_programmed("iommufd", first)
    with machine:
        thread = threading.Thread(target=dies)
        thread.start()
        assert listening.wait(60)
        progress = migrate(machine, endpoint.uri).progress
        thread.join(60)
        assert progress.status == "failed"
        assert journal(machine)[:1] == [(State.RUNNING, State.PRE_COPY)]
        assert journal(machine)[-1:] == [(State.PRE_COPY, State.RUNNING)]
        finish(machine, before)


@pytest.mark.lab(before=build_guests)
def test_pyvmm_migrate_moves_an_mtty_vm_between_processes_and_snapshot_keeps_its_state(
    mttys: tuple[str, str], tmp_path: Path
) -> None:
    """From the command line: `pyvmm run --vfio-dev A`, then `pyvmm migrate` to a
    `pyvmm run --incoming --vfio-host A=B` process, which `pyvmm snapshot --stop` then writes
    out with no --allow-device-reset; restored onto A, the guest finds its device as it left
    it before the migration."""
    first, second = mttys
    console, control, moved_control = tmp_path / "console", tmp_path / "c1", tmp_path / "c2"
    uri = f"unix:{tmp_path / 'migration.sock'}"
    source = spawn("run", str(guest("mtty-state")), "--vfio-dev", first,
                   "--console", f"file:{console}", "--control", str(control))  # fmt: skip
    moved = spawn("run", "--incoming", uri, "--vfio-host", f"{first}={second}",
                  "--control", str(moved_control))  # fmt: skip
    try:
        wait_for_file(console, source, "mtty-state: ready\n")
        before = re.search(rf"mtty-state: before ({REGISTERS})\n", console.read_text())
        assert before is not None
        wait_for_file(moved_control, moved)
        migrated = pyvmm("migrate", str(control), uri, "--downtime", "300", timeout=180)
        assert migrated.returncode == 0, migrated.stderr
        assert re.search(r"devices: 24 bytes sent ahead, switch-over acknowledged", migrated.stdout)
        print(migrated.stdout.strip())
        source.communicate(timeout=60)
        assert source.returncode == 0
        wait_for_file(moved_control, moved)
        saved = pyvmm("snapshot", str(moved_control), str(tmp_path / "snap"), "--stop", timeout=180)
        assert saved.returncode == 0, saved.stderr
        moved.communicate(timeout=60)
    finally:
        for proc in (source, moved):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    restored = snapshot.restore(
        snapshot.read(tmp_path / "snap"), CaptureConsole(), hosts={second: first}
    )
    with restored:
        finish(restored, before.group(1))


@pytest.mark.lab(before=build_guests)
def test_post_copy_with_a_migrating_device_is_refused_in_one_line_before_anything_moves(
    mttys: tuple[str, str], tmp_path: Path
) -> None:
    first, _ = mttys
    machine, before = start_programmed("iommufd", first)
    with machine:
        uri = f"unix:{tmp_path / 'nowhere.sock'}"
        with pytest.raises(MigrationError) as refused:
            Migration(machine, Endpoint.parse(uri), info={}, postcopy=True).run()
        assert re.fullmatch(
            r"cannot migrate this machine: slot \d+ \(vfio-pci\): post-copy cannot take a "
            r"passed-through device: .*\(QEMU refuses it too\); migrate without --postcopy",
            str(refused.value),
        )
        assert journal(machine) == []  # nothing was asked of the device
        finish(machine, before)


@pytest.mark.lab(before=build_guests)
def test_an_incremental_snapshot_of_an_mtty_vm_logs_the_devices_dma_and_restores_whole(
    mttys: tuple[str, str], tmp_path: Path
) -> None:
    """As the control socket takes them: the dirty log started with the full snapshot (the
    mtty's own DMA log with it), an incremental one on top, restored onto a second mdev."""
    first, second = mttys
    machine, before = start_programmed("iommufd", first)
    with machine:
        device_log = machine.vfio().migrations.dma_logs[first]
        assert machine.pause()
        machine.dirty.start()
        assert device_log.logging  # started with the machine's log
        snapshot.write(machine, tmp_path / "full", {})
        machine.resume()
        time.sleep(0.5)  # (the guest's ticks write its RAM meanwhile)
        assert machine.pause()
        since = machine.dirty.collect()  # (the device's log read with KVM's)
        assert any(bitmap.count() for bitmap in since)
        snapshot.write(machine, tmp_path / "incremental", {}, parent=tmp_path / "full", dirty=since)
        machine.dirty.stop()
        assert not device_log.logging
        machine.stop()
    restored = snapshot.restore(
        snapshot.read(tmp_path / "incremental"), CaptureConsole(), hosts={first: second}
    )
    with restored:
        finish(restored, before)
