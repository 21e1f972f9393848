"""The parts of a machine that hold state or run threads, and what the machine asks of them.

Two small protocols, stacked by what a part can do (cloud-hypervisor's Pausable/Snapshottable),
and three optional members:

- `Pausable`: `pause()` returns once the part has stopped touching the guest (a device worker
  parks between requests, finishing the one in flight); `resume()` lets it go on.
- `Stateful`: `save()` returns the part's state as a versioned dataclass (`state_type`, with a
  `VERSION` class attribute; see pyvmm.machine.state) and `restore(state)` puts it back into a
  part built the same way (Firecracker's persist modules: state is plain data, the part is
  rebuilt from the machine's configuration, then given its state).

A stateful part may also have any of five optional members, which the registry looks up by
name (getattr) rather than making every part define them:

- `check(state)`: raise StateError when a well-formed state still does not fit this part
  (another number of queues, another kernel's struct sizes); called for every part before any
  is restored.
- `prepare_restore()`: do ahead what the first restore would (a vCPU probes its MSRs), for a
  restore that must be quick (a migration's destination, before the downtime).
- `upgrade_state(version, data)`: the plain data of a state saved by an older version of the
  part, made into the current version's (None if it cannot be).
- `state_caveat`: a non-empty string when the saved state leaves out part of what the part is
  (a passed-through device, whose own state needs VFIO migration): a migration is refused
  with it, and a snapshot is taken only when asked for knowingly.
- `precopy`: true when part of the state can be read ahead while the part runs (a device with
  VFIO PRE_COPY); a live migration then sends it during its rounds (the part's
  `precopy_begin/read/abort/load` and `stop_copy_bytes`: pyvmm.migration.device_precopy).

The Machine registers every such part in one `Components` registry under a stable id (`vcpu0`,
`rtc`, `pci/00:03.0`), in the order that restore needs: the VM-wide KVM state, then the vCPUs,
then the devices. `save_all()` is the sum of the parts' states, each wrapped in a `SavedState`
that names its id, kind and version; `restore_all()` checks every one of them (id, kind,
version, shape) before it touches any part, so a stream that does not fit leaves the machine as
it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from pyvmm.machine.state import StateError, from_plain, prepare, to_plain
from pyvmm.uapi.ioctl import IoctlError


@runtime_checkable
class Pausable(Protocol):
    def pause(self) -> None:
        """Stop touching the guest (its memory, interrupts, device registers) until resume()."""

    def resume(self) -> None: ...


@runtime_checkable
class Stateful(Protocol):
    state_type: ClassVar[type]

    def save(self) -> Any:
        """The part's state, an instance of `state_type`."""

    def restore(self, state: Any) -> None:
        """Take `state` (as `save()` returned it, here or in another process)."""


@dataclass(frozen=True)
class SavedState:
    """One part's state as plain data, with what a reader checks before using it."""

    component: str
    kind: str
    version: int
    data: Any


def state_version(state_type: type) -> int:
    version = getattr(state_type, "VERSION", None)
    if not isinstance(version, int):
        raise TypeError(f"state type {state_type.__name__} has no integer VERSION")
    return version


_KINDS: dict[type, tuple[bool, bool]] = {}


def _kinds(part: object) -> tuple[bool, bool]:
    """Whether `part` is Pausable and Stateful, asked of the first part of each class (the
    protocols ask for methods and a class attribute, which its instances share)."""
    kinds = _KINDS.get(type(part))
    if kinds is None:
        kinds = _KINDS[type(part)] = (isinstance(part, Pausable), isinstance(part, Stateful))
    return kinds


class Components:
    """A machine's pausable and stateful parts by id, in registration order."""

    def __init__(self) -> None:
        self._parts: dict[str, object] = {}
        # What each part is, decided once (and per class, in _kinds): a runtime protocol check
        # is slow, and a restore's budget is a few milliseconds.
        self._pausable_ids: set[str] = set()
        self._stateful_ids: set[str] = set()

    def add(self, component_id: str, part: object) -> None:
        if component_id in self._parts:
            raise ValueError(f"component id {component_id!r} is taken")
        pausable, stateful = _kinds(part)
        if not (pausable or stateful):
            raise TypeError(
                f"{component_id}: {type(part).__name__} is neither Pausable nor Stateful"
            )
        if stateful:
            state_version(part.state_type)  # type: ignore[attr-defined]
            self._stateful_ids.add(component_id)
        if pausable:
            self._pausable_ids.add(component_id)
        self._parts[component_id] = part

    def remove(self, component_id: str) -> None:
        del self._parts[component_id]
        self._pausable_ids.discard(component_id)
        self._stateful_ids.discard(component_id)

    def __getitem__(self, component_id: str) -> object:
        return self._parts[component_id]

    def __contains__(self, component_id: object) -> bool:
        return component_id in self._parts

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._parts))

    def _pausable(self) -> list[Pausable]:
        return [part for cid, part in self._parts.items() if cid in self._pausable_ids]  # type: ignore[misc]

    def _stateful(self) -> dict[str, Stateful]:
        return {cid: part for cid, part in self._parts.items() if cid in self._stateful_ids}  # type: ignore[misc]

    # pause

    def pause_all(self) -> None:
        """Pause every pausable part in order; if one fails, resume those already paused."""
        paused: list[Pausable] = []
        try:
            for part in self._pausable():
                part.pause()
                paused.append(part)
        except BaseException:
            for part in reversed(paused):
                part.resume()
            raise

    def resume_all(self) -> None:
        for part in reversed(self._pausable()):
            part.resume()

    # save and restore

    def save_all(self) -> list[SavedState]:
        saved = []
        for component_id, part in self._stateful().items():
            state = part.save()
            if type(state) is not part.state_type:
                raise TypeError(f"{component_id}: save() gave a {type(state).__name__}")
            saved.append(
                SavedState(
                    component_id,
                    part.state_type.__name__,
                    state_version(part.state_type),
                    to_plain(state),
                )
            )
        return saved

    def caveats(self) -> dict[str, str]:
        """What the saved state of each part that cannot save all of it leaves out, by id: a
        part says so with a `state_caveat` attribute (a passed-through device, whose own
        state needs VFIO migration)."""
        return {
            cid: caveat
            for cid, part in self._stateful().items()
            if (caveat := getattr(part, "state_caveat", ""))
        }

    def precopy_parts(self) -> dict[str, Any]:
        """The parts whose state can be read ahead while they run (`precopy`), by id."""
        return {
            cid: part for cid, part in self._stateful().items() if getattr(part, "precopy", False)
        }

    def stopped_state_parts(self) -> dict[str, Any]:
        """The parts whose state, at the stop, is read out in pieces ahead of their saved
        state (`stop_copy_pieces`: a device that migrates), by id."""
        return {
            cid: part
            for cid, part in self._stateful().items()
            if hasattr(part, "stop_copy_pieces") and getattr(part, "migrates", False)
        }

    def prepare_restore(self) -> None:
        """Do now what the first restore would otherwise spend on learning the state types,
        and whatever a part's own `prepare_restore()` does (a migration's destination, before
        the downtime)."""
        for part in self._stateful().values():
            prepare(part.state_type)
            own = getattr(part, "prepare_restore", None)
            if own is not None:
                own()

    def decode(self, saved: list[SavedState]) -> dict[str, Any]:
        """Check saved states against the parts (all of them, nothing else), rebuild each part's
        state and let the part `check` it; StateError naming the first that does not fit."""
        parts = self._stateful()
        by_id: dict[str, SavedState] = {}
        for item in saved:
            if item.component in by_id:
                raise StateError(f"the saved state has component {item.component!r} twice")
            by_id[item.component] = item
        unknown = [cid for cid in by_id if cid not in parts]
        if unknown:
            raise StateError(
                f"the saved state has {', '.join(map(repr, unknown))}, which this machine does "
                "not have "
                "(was it saved from a machine with other devices?)"
            )
        missing = [cid for cid in parts if cid not in by_id]
        if missing:
            raise StateError(f"the saved state lacks {', '.join(missing)}")
        decoded = {}
        for component_id, part in parts.items():
            item = by_id[component_id]
            kind, version = part.state_type.__name__, state_version(part.state_type)
            if item.kind != kind:
                raise StateError(f"{component_id}: saved state is a {item.kind!r}, not a {kind}")
            data = item.data
            upgrade = getattr(part, "upgrade_state", None)
            if item.version != version:
                older = item.version < version and upgrade is not None
                data = upgrade(item.version, data) if older else None  # type: ignore[misc]
            if data is None:
                raise StateError(
                    f"{component_id}: saved {kind} is version {item.version}; this pyvmm reads "
                    f"version {version}" + (" and some older ones" if upgrade else " only")
                )
            state = from_plain(part.state_type, data, component_id)
            check = getattr(part, "check", None)
            if check is not None:
                check(state)
            decoded[component_id] = state
        return decoded

    def restore_all(self, saved: list[SavedState]) -> None:
        """Restore every stateful part, in registration order, once all have been checked."""
        self.apply(self.decode(saved))

    def apply(self, decoded: dict[str, Any]) -> None:
        """Give each part its state from `decode()`, in registration order. The kernel has the
        last word on its own structs: a state KVM refuses (a corrupt or forged one that is
        well-formed) is a StateError too, but by then the parts before it hold their new
        state, so the caller must not run the machine (Machine sees to that)."""
        for component_id, part in self._stateful().items():
            try:
                part.restore(decoded[component_id])
            except IoctlError as err:
                raise StateError(
                    f"{component_id}: the kernel refused its saved state ({err}): the state is "
                    "corrupt, or from a host whose KVM differs"
                ) from None
