"""VFIO device migration's state machine on a real kernel: the lab kernel's mtty sample (an
mdev with STOP_COPY, P2P and PRE_COPY) walked from every state to every other, one arc at a
time, on both backends; the kernel's own state checked after each walk, and its data fds read
and written."""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import product
from pathlib import Path

import pytest

from pyvmm.cli import main
from pyvmm.uapi.vfio import VfioDeviceState as State
from pyvmm.uapi.vfio import VfioMigrationFlag as Flag
from pyvmm.vfio.backends import BACKENDS, open_context
from pyvmm.vfio.context import HostDevice
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.migration.device import DeviceMigration
from pyvmm.vfio.migration.states import ForbiddenArc, path
from pyvmm.vfio.sysfs import Sysfs

pytestmark = pytest.mark.lab

MTTY_HEADER = 24  # struct mtty_data up to its ports: magic, versions, flags, nr_ports


@pytest.fixture
def mtty(sysfs: Sysfs) -> Iterator[HostDevice]:
    uuid = sysfs.create_mdev("mtty-2")
    try:
        mdev = sysfs.mdev(uuid)
        yield HostDevice(mdev.uuid, mdev.iommu_group, mdev.cdev, mdev=True)
    finally:
        sysfs.remove_mdev(uuid)


@pytest.fixture(params=sorted(BACKENDS))
def migration(mtty: HostDevice, request: pytest.FixtureRequest) -> Iterator[DeviceMigration]:
    """The mtty opened through each backend in turn."""
    with open_context(request.param) as context:
        yield DeviceMigration(context.open(mtty))


def test_every_state_reaches_every_other_arc_by_arc_as_the_kernel_says(
    migration: DeviceMigration,
) -> None:
    assert migration.flags == Flag.STOP_COPY | Flag.P2P | Flag.PRE_COPY
    assert migration.state is State.RUNNING

    # the device's state, saved once: what RESUMING is given, so that it can be left
    data = migration.move_to(State.STOP_COPY)
    assert data is not None and data.opened_in is State.STOP_COPY
    with data:
        saved = data.read_all()
    assert len(saved) == migration.data_size() > MTTY_HEADER
    assert migration.arcs == [
        (State.RUNNING, State.RUNNING_P2P),
        (State.RUNNING_P2P, State.STOP),
        (State.STOP, State.STOP_COPY),
    ]

    def go(target: State) -> None:
        before, start, open_before = len(migration.arcs), migration.state, migration.data
        data = migration.move_to(target)
        assert migration.state is target
        taken = [arc[1] for arc in migration.arcs[before:]]
        assert taken == path(start, target, migration.flags)
        if target is State.RESUMING and data is not open_before:
            data.write_all(saved)  # (else RESUMING could not be left)

    for start, target in product([s for s in State if s is not State.ERROR], repeat=2):
        go(State.RUNNING)  # (from wherever the last pair ended, STOP_COPY included)
        go(start)
        if start is State.STOP_COPY and target in (State.PRE_COPY, State.PRE_COPY_P2P):
            arcs = len(migration.arcs)
            with pytest.raises(ForbiddenArc, match="the kernel blocks it"):
                migration.move_to(target)
            assert len(migration.arcs) == arcs and migration.state is start  # no ioctl
            continue
        go(target)
    go(State.RUNNING)
    assert migration.data is None  # (each fd closed once its transfer was left)


def test_pre_copy_gives_its_initial_bytes_then_stop_copy_the_rest_on_the_same_fd(
    migration: DeviceMigration,
) -> None:
    size = migration.data_size()
    data = migration.move_to(State.PRE_COPY)
    assert data is not None and data.opened_in is State.PRE_COPY
    with data:
        assert data.precopy_info() == (MTTY_HEADER, 0)  # mtty's initial bytes: its header
        header = data.read_available()
        assert len(header) == MTTY_HEADER and data.precopy_info() == (0, 0)
        assert migration.move_to(State.STOP_COPY) is data  # via PRE_COPY_P2P: the fd goes on
        assert migration.arcs[-2:] == [
            (State.PRE_COPY, State.PRE_COPY_P2P),
            (State.PRE_COPY_P2P, State.STOP_COPY),
        ]
        rest = data.read_all()
    assert len(header + rest) == size
    migration.move_to(State.RUNNING)


def test_a_state_cut_short_is_refused_naming_the_arc_and_can_be_completed(
    migration: DeviceMigration,
) -> None:
    """Resuming from the first bytes of a saved state fails on the way out of RESUMING,
    naming the arc, and leaves the device in RESUMING (mtty checks the state's length there).
    mtty has no VFIO reset, so recover() says it cannot; the rest of the state, written to the
    same fd, completes it."""
    data = migration.move_to(State.STOP_COPY)
    assert data is not None
    with data:
        saved = data.read_all()
    migration.move_to(State.RUNNING)
    data = migration.move_to(State.RESUMING)
    assert data is not None
    with data:
        data.write_all(saved[:MTTY_HEADER])
        with pytest.raises(VfioError, match=r"RESUMING -> STOP failed .*device is in RESUMING"):
            migration.move_to(State.RUNNING)
        assert migration.state is State.RESUMING
        with pytest.raises(VfioError, match="the device has no reset"):
            migration.recover()
        assert migration.state is State.RESUMING
        data.write_all(saved[MTTY_HEADER:])
        migration.move_to(State.RUNNING)
    assert migration.state is State.RUNNING


def test_pyvmm_vfio_migration_shows_a_device_and_walks_it(
    mtty: HostDevice, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["vfio", "migration", mtty.name, "--to", "stop_copy"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{mtty.name}: migration flags STOP_COPY|P2P|PRE_COPY, state RUNNING")
    assert out[1:] == [
        "  RUNNING -> RUNNING_P2P",
        "  RUNNING_P2P -> STOP",
        "  STOP -> STOP_COPY",
        f"{mtty.name}: state STOP_COPY, data fd open for STOP_COPY",
    ]
    assert main(["vfio", "migration", "0000:00:1f.7"]) == 1
    assert capsys.readouterr().err.startswith("pyvmm vfio: ")


def test_the_docs_examples_do_as_they_say(
    mtty: HostDevice, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/vfio-migration.md's Python example, and its `pyvmm vfio migration` session, run on
    an mtty mdev (its UUID in place of UUID)."""
    document = (Path(__file__).parents[2] / "docs" / "vfio-migration.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", document, re.S)
    exec(compile(example, "docs/vfio-migration.md", "exec"), {"mtty": mtty})
    capsys.readouterr()
    (session,) = re.findall(r"```\n\$ pyvmm (.*?)\n(.*?)```", document, re.S)
    command, shown = (part.replace("UUID", mtty.name) for part in session)
    assert main(command.split()) == 0
    assert capsys.readouterr().out == shown
