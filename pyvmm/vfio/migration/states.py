"""The VFIO device migration state machine (v2 uAPI, include/uapi/linux/vfio.h), as a graph.

A device that migrates has the states STOP, RUNNING, STOP_COPY and RESUMING (its migration flags
say VFIO_MIGRATION_STOP_COPY); with VFIO_MIGRATION_P2P it also has RUNNING_P2P (running, but no
longer starting DMA to or taking it from other devices), with VFIO_MIGRATION_PRE_COPY it has
PRE_COPY (running, its state readable ahead of the stop), and with both PRE_COPY_P2P. ERROR is
where a failed arc may leave it.

vfio.h defines the single arcs a driver implements, each with the flag that brings it:

    STOP_COPY   STOP -> STOP_COPY -> STOP, STOP -> RESUMING -> STOP,
                RUNNING <-> STOP (only without P2P: with it, the way goes through RUNNING_P2P)
    P2P         RUNNING <-> RUNNING_P2P <-> STOP
    PRE_COPY    RUNNING <-> PRE_COPY, PRE_COPY -> STOP_COPY (only without P2P)
    both        PRE_COPY <-> PRE_COPY_P2P <-> RUNNING_P2P, PRE_COPY_P2P -> STOP_COPY

and a combination of them between any two states the device has, as the kernel takes them for
one VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: the shortest way that passes through no state where
data moves (STOP_COPY, RESUMING, PRE_COPY, PRE_COPY_P2P) except at its ends — unless it goes
on saving: from a PRE_COPY state to another saving state (PRE_COPY_P2P, STOP_COPY) it passes
through the saving states, and the data_fd that PRE_COPY opened carries on — and never from
STOP_COPY back to a PRE_COPY state (the kernel blocks it). `path()` computes that way, so that
pyvmm can take it one arc at a time and log each. (Checked against the kernel's own table,
vfio_mig_get_next_state() in drivers/vfio/vfio_main.c, for every pair of states under each of
the four sets of flags.)
"""

from __future__ import annotations

from collections import deque

from pyvmm.uapi.vfio import VfioDeviceState as State
from pyvmm.uapi.vfio import VfioMigrationFlag as Flag
from pyvmm.vfio.errors import VfioError

#: The states where data moves: a data_fd is opened on the arc into one (or carried on).
TRANSFER_STATES = frozenset({State.STOP_COPY, State.RESUMING, State.PRE_COPY, State.PRE_COPY_P2P})
#: The states of a saving under way: the data_fd read in one carries on into the next.
SAVING_STATES = frozenset({State.PRE_COPY, State.PRE_COPY_P2P, State.STOP_COPY})


class ForbiddenArc(VfioError):
    """No way leads from one state to the other on this device."""


def states(flags: Flag) -> frozenset[State]:
    """The states a device with migration `flags` has (none without STOP_COPY)."""
    if not flags & Flag.STOP_COPY:
        return frozenset()
    have = {State.STOP, State.RUNNING, State.STOP_COPY, State.RESUMING}
    if flags & Flag.P2P:
        have.add(State.RUNNING_P2P)
    if flags & Flag.PRE_COPY:
        have.add(State.PRE_COPY)
    if flags & Flag.P2P and flags & Flag.PRE_COPY:
        have.add(State.PRE_COPY_P2P)
    return frozenset(have)


def arcs(flags: Flag) -> dict[State, list[State]]:
    """The single arcs of a device with migration `flags`: each state's next states."""
    p2p, pre_copy = bool(flags & Flag.P2P), bool(flags & Flag.PRE_COPY)
    pairs = [
        (State.STOP, State.STOP_COPY),
        (State.STOP_COPY, State.STOP),
        (State.STOP, State.RESUMING),
        (State.RESUMING, State.STOP),
    ]
    if p2p:
        pairs += [
            (State.RUNNING, State.RUNNING_P2P),
            (State.RUNNING_P2P, State.RUNNING),
            (State.RUNNING_P2P, State.STOP),
            (State.STOP, State.RUNNING_P2P),
        ]
    else:
        pairs += [(State.RUNNING, State.STOP), (State.STOP, State.RUNNING)]
    if pre_copy:
        pairs += [(State.RUNNING, State.PRE_COPY), (State.PRE_COPY, State.RUNNING)]
        if p2p:
            pairs += [
                (State.PRE_COPY, State.PRE_COPY_P2P),
                (State.PRE_COPY_P2P, State.PRE_COPY),
                (State.RUNNING_P2P, State.PRE_COPY_P2P),
                (State.PRE_COPY_P2P, State.RUNNING_P2P),
                (State.PRE_COPY_P2P, State.STOP_COPY),
            ]
        else:
            pairs.append((State.PRE_COPY, State.STOP_COPY))
    graph: dict[State, list[State]] = {state: [] for state in states(flags)}
    for start, end in pairs:
        graph[start].append(end)
    return graph


def path(start: State, target: State, flags: Flag) -> list[State]:
    """The states a device with migration `flags` goes through from `start` to `target`, one
    arc each, `target` last ([] if it is there); ForbiddenArc if no way leads there."""
    have = states(flags)
    for state in (start, target):
        if state not in have:
            raise ForbiddenArc(f"the device has no {state.name} state (migration flags {flags!r})")
    if start == target:
        return []
    if start is State.STOP_COPY and target in (State.PRE_COPY, State.PRE_COPY_P2P):
        raise ForbiddenArc(f"{start.name} -> {target.name}: the kernel blocks it")
    graph = arcs(flags)
    passable = {state for state in graph if state not in TRANSFER_STATES}
    if start in SAVING_STATES and target in SAVING_STATES:
        passable |= SAVING_STATES  # (the saving goes on)
    came_from: dict[State, State] = {start: start}
    waiting = deque([start])
    while waiting:
        state = waiting.popleft()
        for following in graph[state]:
            if following in came_from:
                continue
            came_from[following] = state
            if following == target:
                way = [target]
                while (previous := came_from[way[-1]]) != start:
                    way.append(previous)
                return way[::-1]
            if following in passable:
                waiting.append(following)
    raise ForbiddenArc(f"{start.name} -> {target.name}: no way without passing a data transfer")
