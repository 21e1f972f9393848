"""Live migration's destination (`pyvmm run --incoming URI`): takes a machine in from a source
(source.py has the exchange).

The destination builds its machine from the CONFIG section (refusing one it cannot build, or
one unlike what its options ask for), writes pages only inside its RAM regions (the stream is
untrusted), restores the state after END, and hands back an `Incoming` machine, paused: whoever
took it in starts it and then confirms, so that the source stops. Whatever fails before the
confirmation is sent to the source as a refusal, and the source runs on.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvmm.board.devices import pins_guest_ram
from pyvmm.board.machine import Machine, SavedMachine
from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.kvm.errors import KvmError
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.kvm.userfaultfd import UserFaultFd
from pyvmm.machine.component import SavedState
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.console import Console
from pyvmm.machine.memory import GuestMemoryError
from pyvmm.machine.state import StateError
from pyvmm.migration import machine_sections, postcopy, transport
from pyvmm.migration.device_precopy import DeviceLoader
from pyvmm.migration.pages import LONG_RUN, PAGE_SECTIONS, Malformed, page_writes, where
from pyvmm.migration.postcopy_link import PostcopyIn
from pyvmm.migration.sockets import json_line
from pyvmm.migration.stream import SectionType, StreamError, StreamReader
from pyvmm.migration.transport import Endpoint, MigrationError, answer


@dataclass
class Incoming:
    """A machine received from a migration, restored, paused and not yet started (its devices
    take no host input yet: a tap's frames still go to the source): `start()` it, then
    `report_running()` so that the source stops. After a switch to post-copy (`postcopy`), its RAM
    still comes in, on a thread of its own from `report_running()` on; should the source be lost
    before it is all in, the machine stops with the error."""

    machine: Machine
    info: dict[str, Any]
    _sock: socket.socket
    restore_seconds: float = 0.0  # from the stream's END to the machine restored
    _restored_at: float = field(default_factory=time.monotonic)
    postcopy: PostcopyIn | None = None
    postcopy_seconds: float = 0.0  # then setting post-copy up (its RAM dropped, registered)

    def start(self) -> None:
        """Start the machine and let it run (its devices take host input from now on)."""
        self.machine.start()
        self.machine.resume()

    def report_running(self) -> None:
        """Tell the source that this copy runs; MigrationError if it cannot be told (the
        source then keeps its copy paused, and this one must not run on: stop it)."""
        phases = {
            "restore": round(self.restore_seconds * 1000, 3),
            **({"postcopy": round(self.postcopy_seconds * 1000, 3)} if self.postcopy else {}),
            "start": round((time.monotonic() - self._restored_at) * 1000, 3),
        }
        resumed = {"resumed": True, "phases_ms": phases, "postcopy": self.postcopy is not None}
        try:
            if self.postcopy is not None:
                self.postcopy.report_running(resumed)
                return
            self._sock.sendall(json_line(resumed))
        except OSError as err:
            if self.postcopy is not None:
                self.postcopy.fail("the source went away as post-copy began")
            raise MigrationError(
                f"the source went away before it heard that this copy runs ({err.strerror}); "
                "this copy stops, the source's stays paused"
            ) from None
        finally:
            if self.postcopy is None:
                self._sock.close()


def receive(
    endpoint: Endpoint,
    console: Callable[[dict[str, Any]], Console],
    *,
    expect: Callable[[MachineConfig], str] | None = None,
    trace_exits: bool = False,
    on_listening: Callable[[], None] | None = None,
    hosts: dict[str, str] | None = None,
) -> Incoming:
    """Wait for one migration at `endpoint` and take it in. `console(info)` opens the machine's
    console, knowing where the source's went (`info["console"]`); `expect(config)` says what
    is wrong with the incoming configuration for this destination ("" if nothing). A problem
    is sent to the source as a refusal, and raised here. `hosts` moves assigned devices to
    other host devices (MachineConfig.with_hosts)."""
    sock = endpoint.accept_source(on_listening)
    try:
        return receive_from(
            sock, endpoint, console, expect=expect, trace_exits=trace_exits, hosts=hosts
        )
    except BaseException:
        # Shut down, so that the source sees the end at once, its sends failing (the files
        # made from the socket would otherwise keep it open), and reads the answer given.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        raise


def receive_from(
    sock: socket.socket,
    endpoint: Endpoint,
    console: Callable[[dict[str, Any]], Console],
    *,
    expect: Callable[[MachineConfig], str] | None = None,
    trace_exits: bool = False,
    hosts: dict[str, str] | None = None,
) -> Incoming:
    """Take in the migration a source sends on the connected `sock` (see `receive`; `endpoint`
    names the source's address in messages)."""
    what = f"the migration stream from {endpoint.uri}"
    sock.settimeout(transport.REPLY_TIMEOUT)  # a source that stalls this long has gone
    stream = sock.makefile("rb", buffering=1 << 20)
    try:
        reader = StreamReader(stream, what)
        config = machine_sections.decode_config(reader.next(), what)
        try:
            config = config.with_hosts(hosts or {})
        except ConfigError as err:
            answer(sock, {"error": str(err)})
            raise
        section = reader.next_known()
        if section.type != SectionType.INFO:
            raise StreamError(f"{what}: the configuration is not followed by INFO")
        info = machine_sections.decode_info(section, what)
        problem = expect(config) if expect is not None else ""
        if problem:
            answer(sock, {"error": problem})
            raise MigrationError(f"refused the incoming machine: {problem}")
        try:
            machine = Machine.from_config(config, console(info), trace_exits=trace_exits)
        except (PyvmmError, OSError) as err:
            answer(sock, {"error": f"cannot build the machine: {err}"})
            raise
    except StreamError as err:
        answer(sock, {"error": str(err)})
        raise
    except OSError as err:
        raise MigrationError(f"{what} broke: {err.strerror or err}") from None
    with contextlib.ExitStack() as until_taken:
        until_taken.callback(machine.close)  # unless it is taken in whole
        incoming = _restore(sock, reader, machine, config, info, what)
        until_taken.pop_all()
    return incoming


def _restore(
    sock: socket.socket,
    reader: StreamReader,
    machine: Machine,
    config: MachineConfig,
    info: dict[str, Any],
    what: str,
) -> Incoming:
    """The rest of `receive_from`, once the machine is built: accept, read the pages and the state,
    restore it; a failure the source should hear of is answered to it, and raised (the
    caller closes the machine)."""
    machine.pause()  # not started: it will start paused, its devices quiet
    try:
        machine.components.prepare_restore()  # (now: not in the downtime)
    except (OSError, KvmError) as err:
        why = f"cannot prepare the machine for its state: {err}"
        answer(sock, {"error": why})
        raise MigrationError(why) from None
    answer(sock, {"accept": True, **_postcopy_ability(machine)})
    devices = DeviceLoader(machine.components, lambda: answer(sock, {"switchover_ack": True}))
    try:
        components, pending = _read_body(reader, machine, devices, what)
        ended = time.monotonic()
    except OSError as err:
        raise MigrationError(f"{what} broke: {err.strerror or err}") from None
    except StateError as err:
        answer(sock, {"error": str(err)})
        raise MigrationError(str(err)) from None
    try:
        machine.restore(SavedMachine(config, components))
        restored = time.monotonic()
    except (StateError, OSError, KvmError) as err:  # (the kernel refused a part: source runs on)
        why = str(err) if isinstance(err, StateError) else f"restoring the machine failed: {err}"
        answer(sock, {"error": why})
        raise MigrationError(why) from None
    postcopy_in = None
    if pending is not None:
        try:
            postcopy_in = PostcopyIn(machine, pending, sock, reader)
        except (postcopy.PostcopyError, OSError, KvmError) as err:  # (refused: the source runs on)
            why = f"cannot take the post-copy in: {err}"
            answer(sock, {"error": why})
            raise MigrationError(why) from None
    ready = time.monotonic()
    return Incoming(machine, info, sock, restored - ended, ready, postcopy_in, ready - restored)


def _postcopy_ability(machine: Machine) -> dict[str, Any]:
    """What the accept says of post-copy: whether this destination can take it, or why not."""
    if any(pins_guest_ram(device.kind) for device in machine.config.devices):
        return {"postcopy_unavailable": "a passed-through device pins the machine's RAM"}
    try:
        UserFaultFd().close()
    except KvmError as err:
        return {"postcopy_unavailable": str(err)}
    return {"postcopy": True}


class _PreFaults:
    """Pre-faults the pages of an incoming machine, each page once: a guest's hot pages come
    again in every round, and KVM keeps them mapped after the first (another call each would
    cost, in the downtime too, for nothing). One byte per page of RAM: 0.025% of it."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.done = {
            region.gpa: bytearray(region.size // PAGE_SIZE) for region in machine.memory.regions
        }

    def __call__(self, gpa: int, size: int) -> None:
        if not self.machine.can_pre_fault:
            return
        region = self.machine.memory.region_for(gpa, size)
        done = self.done[region.gpa]
        first, last = (gpa - region.gpa) // PAGE_SIZE, (gpa + size - region.gpa) // PAGE_SIZE
        if done.find(0, first, last) < 0:
            return
        if self.machine.pre_fault(gpa, size):
            done[first:last] = b"\x01" * (last - first)


def _read_body(
    reader: StreamReader, machine: Machine, devices: DeviceLoader, what: str
) -> tuple[list[SavedState], bytes | None]:
    """The pages, the devices' data sent ahead and the components' states, up to END; or up
    to POSTCOPY, whose payload (the pages this machine lacks) is returned with them."""
    components: list[SavedState] = []
    memory = machine.memory
    pre_fault = _PreFaults(machine)
    for section in reader.sections():
        kind = section.type
        try:
            if kind in PAGE_SECTIONS and not components:
                zeros = kind == SectionType.ZERO_PAGES
                for gpa, pages in page_writes(section):
                    # Where KVM can, the pages go into its page tables now, not when the
                    # guest resumes and touches them, each with a fault; where it cannot, long
                    # runs (round 0's) are faulted into pyvmm's mapping at least (for short
                    # ones a call each would cost the downtime more than it saves). Pages that
                    # became zeros are neither: a page the guest freed is cold.
                    if zeros:
                        memory.write_pages(gpa, pages)
                        continue
                    populate = len(pages) >= LONG_RUN and not machine.can_pre_fault
                    memory.write_pages(gpa, pages, populate=populate)
                    pre_fault(gpa, len(pages))
            elif kind == SectionType.SAVING_AHEAD and not components:
                devices.expect(section, what)
            elif kind == SectionType.DEVICE_DATA and not components:
                devices.load(section, what)
            elif kind == SectionType.DEVICE_STATE and not components:
                devices.load_state(section, what)
            elif kind == SectionType.COMPONENT:
                components.append(machine_sections.decode_component(section, what))
            elif kind == SectionType.POSTCOPY and components:
                return components, section.payload
            else:
                raise StreamError(f"{where(what, section)} is out of place")
        except GuestMemoryError as err:
            raise StreamError(f"{where(what, section)} has pages outside RAM ({err})") from None
        except Malformed as err:
            raise StreamError(f"{where(what, section)} is malformed ({err})") from None
    return components, None
