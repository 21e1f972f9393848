"""A VM with an mtty mdev saved and restored with the mdev's own state (VFIO device migration):
the mtty-state guest programs the port and leaves a pattern in its FIFO, the VM is snapshotted
(no --allow-device-reset: the device migrates) and restored onto a second mdev, or live-migrated
onto one (source and destination machines in this process, on threads of their own), and the
guest reads back the registers and the pattern, which only the device's saved state can give (a
reset mtty has LCR 0 and an empty FIFO), then takes an interrupt from it. The arcs each side's
devices took are checked in order, on both backends; the live migration runs with the mtty's
own DMA log (its driver has the ops) started, read and stopped around it."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from guestbuild import guest
from lab_passthrough import BACKENDS

from pyvmm.board.machine import Machine, RunState
from pyvmm.machine.console import CaptureConsole
from pyvmm.machine.vcpus import StopReason
from pyvmm.migration import snapshot
from pyvmm.migration.destination import Incoming, receive
from pyvmm.migration.source import Migration
from pyvmm.migration.transport import Endpoint
from pyvmm.uapi.vfio import VfioDeviceState as State
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
def mttys(sysfs: Sysfs) -> Iterator[tuple[str, str]]:
    """Two mtty-2 mdevs (their UUIDs): the source's and the destination's."""
    made: list[str] = []
    try:
        for _ in range(2):
            made.append(sysfs.create_mdev("mtty-2"))
        yield made[0], made[1]
    finally:
        for uuid in made:
            sysfs.remove_mdev(uuid)


def start_programmed(backend: str, mdev: str) -> tuple[Machine, str]:
    """A machine with `mdev` running mtty-state up to its wait; the registers it programmed."""
    machine = Machine(mem_size=64 * MiB, console=CaptureConsole())
    try:
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


@pytest.mark.lab(before=build_guests)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_mtty_vm_live_migrated_onto_a_second_mdev_finds_the_device_as_it_left_it(
    backend: str, mttys: tuple[str, str], tmp_path: Path
) -> None:
    first, second = mttys
    uri = f"unix:{tmp_path / 'migration.sock'}"
    arrived: list[Incoming] = []
    listening = threading.Event()

    def destination() -> None:
        incoming = receive(
            Endpoint.parse(uri),
            lambda info: CaptureConsole(),
            on_listening=listening.set,
            hosts={first: second},
        )
        arrived.append(incoming)
        incoming.start()
        incoming.report_running()

    machine, before = start_programmed(backend, first)
    try:
        migrate_and_check(machine, backend, first, uri, destination, listening)
        (incoming,) = arrived
        assert journal(incoming.machine) == [
            *PAUSE,
            (State.STOP, State.RESUMING),  # at the first data sent ahead
            (State.RESUMING, State.STOP),
            *RESUME,
        ]
        finish(incoming.machine, before)
    finally:  # (also on a failure: a destination left holding its mdev hangs the removal)
        for incoming in arrived:
            incoming.machine.close()


def migrate_and_check(
    machine: Machine,
    backend: str,
    first: str,
    uri: str,
    destination: Callable[[], None],
    listening: threading.Event,
) -> None:
    """Migrate `machine` to the destination thread; check the source's side."""
    with machine:
        migrating = machine.vfio().migrations
        assert list(migrating.dma_logs) == [first]  # (mtty's driver has DMA logging)
        thread = threading.Thread(target=destination)
        thread.start()
        try:
            assert listening.wait(60)
            migration = Migration(machine, Endpoint.parse(uri), info={})
            migration.run()
        finally:
            thread.join(120)
        progress = migration.progress
        assert progress.status == "completed"
        assert not migrating.dma_logs[first].logging  # started with the log, stopped with it
        # saved ahead from the first round (PRE_COPY), stopped on the same data fd, the rest
        # read at the stop; the switch-over waited for the destination's acknowledgement
        assert journal(machine) == [
            (State.RUNNING, State.PRE_COPY),
            (State.PRE_COPY, State.PRE_COPY_P2P),
            (State.PRE_COPY_P2P, State.STOP_COPY),
            (State.STOP_COPY, State.STOP),
        ]
        assert progress.device_precopy_bytes == MTTY_HEADER  # mtty's initial bytes, no dirty
        assert progress.switchover_ack_ms > 0
        print(
            f"mtty live migration ({backend}): downtime {progress.downtime_ms:.1f} ms, "
            f"phases {progress.downtime_phases_ms}, {progress.device_precopy_bytes} device "
            f"bytes ahead, switch-over acknowledged in {progress.switchover_ack_ms:.1f} ms"
        )
