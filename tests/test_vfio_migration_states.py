"""The VFIO migration state machine as pyvmm walks it (pyvmm.vfio.migration.states): the ways
vfio.h describes between states, under each set of migration flags; the lab's mtty walks them on
a real kernel (tests/lab/test_lab_vfio_migration.py)."""

from __future__ import annotations

from itertools import product

import pytest

from pyvmm.uapi.vfio import VfioDeviceState as S
from pyvmm.uapi.vfio import VfioMigrationFlag as F
from pyvmm.vfio.migration.states import (
    SAVING_STATES,
    TRANSFER_STATES,
    ForbiddenArc,
    arcs,
    path,
    states,
)

BASIC = F.STOP_COPY
ALL = F.STOP_COPY | F.P2P | F.PRE_COPY
FLAG_SETS = [BASIC, BASIC | F.P2P, BASIC | F.PRE_COPY, ALL]


def test_a_device_has_the_states_its_flags_bring() -> None:
    assert states(F(0)) == frozenset()  # no STOP_COPY: it does not migrate
    assert states(BASIC) == {S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING}
    assert states(BASIC | F.P2P) == states(BASIC) | {S.RUNNING_P2P}
    assert states(BASIC | F.PRE_COPY) == states(BASIC) | {S.PRE_COPY}
    assert states(ALL) == set(S) - {S.ERROR}


@pytest.mark.parametrize(
    ("flags", "start", "target", "way"),
    [
        # vfio.h's combination transitions, with every optional state
        (ALL, S.RUNNING, S.STOP_COPY, [S.RUNNING_P2P, S.STOP, S.STOP_COPY]),
        (ALL, S.RESUMING, S.RUNNING, [S.STOP, S.RUNNING_P2P, S.RUNNING]),
        (ALL, S.RESUMING, S.PRE_COPY, [S.STOP, S.RUNNING_P2P, S.RUNNING, S.PRE_COPY]),
        (ALL, S.RUNNING, S.PRE_COPY_P2P, [S.RUNNING_P2P, S.PRE_COPY_P2P]),
        (ALL, S.STOP_COPY, S.RUNNING, [S.STOP, S.RUNNING_P2P, S.RUNNING]),
        (ALL, S.PRE_COPY, S.STOP_COPY, [S.PRE_COPY_P2P, S.STOP_COPY]),  # the saving goes on
        (ALL, S.PRE_COPY, S.RUNNING_P2P, [S.RUNNING, S.RUNNING_P2P]),  # it ends
        (ALL, S.PRE_COPY, S.STOP, [S.RUNNING, S.RUNNING_P2P, S.STOP]),
        # without P2P, RUNNING and STOP are one arc apart, as PRE_COPY and STOP_COPY are
        (BASIC, S.RUNNING, S.STOP_COPY, [S.STOP, S.STOP_COPY]),
        (BASIC | F.PRE_COPY, S.PRE_COPY, S.STOP_COPY, [S.STOP_COPY]),
        (BASIC, S.RESUMING, S.RUNNING, [S.STOP, S.RUNNING]),
        (BASIC, S.RUNNING, S.RUNNING, []),
    ],
)
def test_the_ways_vfio_h_describes(flags: F, start: S, target: S, way: list[S]) -> None:
    assert path(start, target, flags) == way


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_every_way_is_single_arcs_through_no_transfer_but_a_saving_that_goes_on(flags: F) -> None:
    graph = arcs(flags)
    for start, target in product(states(flags), repeat=2):
        try:
            way = path(start, target, flags)
        except ForbiddenArc:
            assert start is S.STOP_COPY and target in (S.PRE_COPY, S.PRE_COPY_P2P)
            continue
        assert (way[-1] if way else start) is target
        for here, there in zip([start, *way], way, strict=False):
            assert there in graph[here], f"{here.name} -> {there.name} is not an arc"
        for passed in way[:-1]:
            saving = start in SAVING_STATES and target in SAVING_STATES
            assert passed not in TRANSFER_STATES or (saving and passed in SAVING_STATES)


def test_what_cannot_be_reached_is_refused_before_anything_is_asked() -> None:
    with pytest.raises(ForbiddenArc, match="STOP_COPY -> PRE_COPY: the kernel blocks it"):
        path(S.STOP_COPY, S.PRE_COPY, ALL)
    with pytest.raises(ForbiddenArc, match="no RUNNING_P2P state"):
        path(S.RUNNING, S.RUNNING_P2P, BASIC)
    with pytest.raises(ForbiddenArc, match="no PRE_COPY state"):
        path(S.PRE_COPY, S.RUNNING, BASIC | F.P2P)
    with pytest.raises(ForbiddenArc, match="no STOP state"):
        path(S.STOP, S.RUNNING, F(0))
