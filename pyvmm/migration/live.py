"""Live migration: iterative pre-copy of a running machine to another pyvmm over a socket.

The source sends one VM state stream (stream.py) and the destination answers on the same
socket with JSON lines:

    source                                      destination (pyvmm run --incoming URI)
    header, CONFIG, INFO                 ->
                                         <-     {"accept": true} | {"error": "why"}
    PAGES / ZERO_PAGES / PAGE_RUNS: all RAM (round 0), then each round the pages dirtied since
    (the machine paused) last dirty pages, COMPONENT*, END
                                         <-     {"resumed": true, "phases_ms": ...} | {"error": ..}

A PAGES section is a u64 guest-physical address followed by the pages' bytes; ZERO_PAGES is a u64
address and a u64 length; PAGE_RUNS carries many short runs of pages, each with its address (a
round's dirty pages are scattered, and a section apiece would cost more than their bytes).

Rounds go on while the pages left would take longer to send, at the bandwidth the last round had,
than the downtime limit allows, less what the switch-over itself takes besides (the state, the
destination's restore: estimated by how long the destination took to build its machine, at most
half the limit); and while they fit, rounds still go on as long as each would halve what is left
(the guest dirties pages at less than half the rate they are sent), down to a tenth of that budget,
so that the downtime is that of a last round as short as the guest's pace allows. Then the source
pauses, sends the rest and the machine's state, and waits for the destination to say that its copy
runs; only then does the source stop. A guest that dirties pages faster than they can be sent never
fits: after `max_rounds` rounds the migration fails with the rates in its message, unless
`auto_converge` throttles it (QEMU's policy, quicker): from the second round, each round whose
pages do not fit and that finds dirty more than half of what the round before it sent raises the
vCPU throttle, to 20% first, then by 10 points a round up to 99%. The throttle ends with the
migration. Anything failing before the destination's "resumed" (a cut connection, a refusal, a
timeout) resumes the source, which never stopped being the machine; so does a destination's
refusal of the state it was sent (it says it does not run it).

With `postcopy` (postcopy.py), pre-copy ends as soon as its rounds stop paying (the guest dirties
more than half as fast as pages are sent, or `max_rounds` went by) with pages left that do not
fit the limit: then the destination runs first, and the pages follow.

The destination builds its machine from the CONFIG section (refusing one it cannot build, or
one unlike what its options ask for), writes pages only inside its RAM regions (the stream is
untrusted), restores the state after END, starts it, and answers.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import queue
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.kvm.errors import KvmError
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.kvm.userfaultfd import UserFaultFd
from pyvmm.libc import libc
from pyvmm.machine.component import SavedState
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.console import Console
from pyvmm.machine.devices import pins_guest_ram
from pyvmm.machine.dirty import DirtyBitmap
from pyvmm.machine.machine import Machine, RunState, SavedMachine, StopReason
from pyvmm.machine.memory import GuestMemory, GuestMemoryError
from pyvmm.machine.state import StateError
from pyvmm.machine.threads import start_thread
from pyvmm.machine.vcpus import MAX_THROTTLE
from pyvmm.migration import memory_file, postcopy, vmstate
from pyvmm.migration.sockets import listen_unix
from pyvmm.migration.stream import (
    Section,
    SectionType,
    StreamError,
    StreamReader,
    StreamWriter,
    section_name,
)

log = logging.getLogger(__name__)

CHUNK = 4 << 20  # bytes of pages per PAGES or PAGE_RUNS section
LONG_RUN = 64 << 10  # dirty pages in a run this long go in a PAGES section of their own
MAX_RUNS = 4096  # runs per PAGE_RUNS section
_ADDRESS = struct.Struct("<Q")
_RUN_COUNT = struct.Struct("<I")
_RUN = struct.Struct("<QI")  # a run's guest-physical address and its number of pages
_ZERO = struct.Struct("<QQ")
_ZERO_CHUNK = bytes(CHUNK)
_ONES = b"\x01" * (CHUNK // PAGE_SIZE)  # a section's pages, marked pre-faulted
REPLY_TIMEOUT = 60.0  # seconds the source waits for an answer (a destination building a VM)
SEND_TIMEOUT = 60.0  # seconds a send may block (a destination that stopped reading)
CONNECT_WAIT = 10.0  # seconds the source waits for a destination to listen
THROTTLE_FIRST, THROTTLE_STEP = 0.2, 0.1  # auto-converge's first throttle and its increments
THROTTLE_TRIGGER = 0.5  # dirty / sent (of the round before) above which a round is too hot
PUSH_PAGES = 32  # pages per section of post-copy's push (a run of them or many runs)
RECEIVE_BUFFER = 512 << 10  # a TCP destination's receive buffer (Endpoint.listen says why)
DRAINED = 64 << 10  # bytes left unread in the socket when the source pauses, at most
PUSH_AHEAD = 64 << 10  # bytes post-copy's push keeps queued in the socket at most
MAX_REQUESTED_PAGES = 1 << 18  # pages one post-copy request may ask for (1 GiB)


class MigrationError(PyvmmError):
    """A migration failed; the source machine runs on."""


# addresses


@dataclass(frozen=True)
class Endpoint:
    """Where a migration goes: `unix:PATH` or `tcp:HOST:PORT`."""

    uri: str
    family: int
    address: str | tuple[str, int]

    @classmethod
    def parse(cls, uri: str) -> Endpoint:
        kind, _, rest = uri.partition(":")
        if kind == "unix" and rest:
            return cls(uri, socket.AF_UNIX, rest)
        if kind == "tcp":
            host, _, port = rest.rpartition(":")
            if host and port.isdigit() and 0 < int(port) < 65536:
                return cls(
                    uri,
                    socket.AF_INET6 if ":" in host else socket.AF_INET,
                    (host.strip("[]"), int(port)),
                )
        raise ConfigError(f"bad migration address {uri!r}: use unix:PATH or tcp:HOST:PORT")

    def connect(self, timeout: float) -> socket.socket:
        """Connect, trying again for CONNECT_WAIT seconds while no one listens yet (a script may
        start the destination and the migration together)."""
        deadline = time.monotonic() + CONNECT_WAIT
        while True:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.address)
                break
            except OSError as err:
                sock.close()
                waiting = isinstance(err, (ConnectionRefusedError, FileNotFoundError))
                if waiting and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise MigrationError(
                    f"cannot connect to {self.uri}: {err.strerror or err}; is a pyvmm run "
                    f"--incoming {self.uri} waiting there?"
                ) from None
        self.no_delay(sock)
        return sock

    def no_delay(self, sock: socket.socket) -> None:
        """A TCP connection's small writes go at once (TCP_NODELAY): the last sections the
        source sends in the downtime, and the destination's answers (a post-copy fault's
        request above all), must not wait on Nagle for the peer's ACK."""
        if self.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def listen(self) -> socket.socket:
        if self.family == socket.AF_UNIX:
            return listen_unix(str(self.address), f"--incoming {self.uri}", backlog=1)
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Bounded (the accepted socket inherits it): what the source sent and this side
            # has not read yet, Linux's autotuning lets grow to megabytes, is read after the
            # source paused, in the downtime; the source can only see its own queue drain.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.bind(self.address)
            sock.listen(1)
        except OSError as err:
            sock.close()
            raise ConfigError(
                f"--incoming {self.uri}: cannot listen there: {err.strerror}"
            ) from None
        return sock


# the source


@dataclass
class Progress:
    """Where a migration is, for `migrate-status` and progress bars."""

    status: str = "setup"  # setup, active, completing, postcopy, completed, failed
    round: int = 0
    ram_bytes: int = 0
    sent_bytes: int = 0  # bytes of the stream sent so far, all rounds
    dirty_bytes: int = 0  # what the last round found dirty
    bandwidth: float = 0.0  # bytes per second, last round
    throttle_percent: int = 0  # the vCPU throttle auto-converge reached (it ends with it)
    postcopy: bool = False  # switched to post-copy: the destination runs, pages still to come
    postcopy_pages: int = 0  # pages the destination lacked when it started
    postcopy_requested_pages: int = 0  # of those, pages its faults asked for ahead of the push
    postcopy_ms: float = 0.0  # from the destination's start until it had every page
    downtime_ms: float = 0.0  # paused until the destination ran (when completed)
    # where the downtime went: pausing, the last pages, saving and sending the state, and the
    # destination restoring and starting it (until its answer came)
    downtime_phases_ms: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""
    rounds: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Migration:
    """Migrates `machine` to `endpoint` on a thread of its own (`start()`); `progress` says how
    far it is and `done` is set when it ends, either way."""

    def __init__(
        self,
        machine: Machine,
        endpoint: Endpoint,
        *,
        info: dict[str, Any],
        downtime_limit: float = 0.03,
        max_rounds: int = 30,
        auto_converge: bool = False,
        postcopy: bool = False,
        on_end: Callable[[Progress], None] | None = None,
    ) -> None:
        self.machine = machine
        self.endpoint = endpoint
        self.info = info
        self.downtime_limit = downtime_limit
        self.max_rounds = max_rounds
        self.auto_converge = auto_converge
        self.postcopy = postcopy
        self.progress = Progress(ram_bytes=machine.memory.size)
        self.done = threading.Event()
        self._on_end = on_end
        self._cancelled = False
        self._running = False  # run() has begun
        self._sock: socket.socket | None = None
        self._pages = _PageCopy(machine.memory)

    def cancel(self) -> None:
        """End a migration under way and wait until it has (the machine is going away): it
        fails at its next batch, its connection shut down so that no send blocks it."""
        self._cancelled = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._running:
            self.done.wait(SEND_TIMEOUT)

    def run(self) -> None:
        """Migrate now, on this thread (not a vCPU's); MigrationError if it fails. A failure
        leaves the source as it was (running, or paused if it was), except once the machine's
        state has gone to the destination and it did not refuse it: then it stays paused,
        since the destination may be running it (and is, after a switch to post-copy)."""
        self._running = True
        started = time.monotonic()
        caveats = self.machine.components.caveats()
        if self.machine.memory.missing:
            caveats = {"its RAM": self.machine.memory.missing}
        if caveats:  # (and the destination could not open the device while this one has it)
            first, caveat = next(iter(caveats.items()))
            self.progress.status, self.progress.error = "failed", f"{first}: {caveat}"
            self._finish(started)
            raise MigrationError(f"cannot migrate this machine: {first}: {caveat}")
        paused = handed_over = False
        pending: postcopy.Pending | None = None
        was_running = self.machine.state is RunState.RUNNING
        dirty = self.machine.dirty
        try:
            with _connection(self.endpoint) as sock:
                self._sock = sock
                out = sock.makefile("wb", buffering=1 << 20)
                answers = sock.makefile("rb")
                writer = StreamWriter(out)
                writer.section(SectionType.CONFIG, vmstate.encode_config(self.machine.config))
                writer.section(SectionType.INFO, vmstate.encode_info(self.info))
                asked = time.monotonic()
                out.flush()
                accepted = _expect(answers, sock, "accept", "building its machine")
                if self.postcopy and accepted.get("postcopy") is not True:
                    why = accepted.get("postcopy_unavailable") or "it does not say it can"
                    raise MigrationError(
                        f"the destination cannot take a post-copy migration ({why}); migrate "
                        "without post-copy (the source runs on)"
                    )
                switch_over = self._switch_over_estimate(time.monotonic() - asked)
                self.progress.status = "active"
                dirty.start()
                self._send_all(writer)
                switch_to_postcopy = False
                while True:
                    bitmaps = dirty.collect()
                    left = sum(bitmap.count() for bitmap in bitmaps) * PAGE_SIZE
                    self.progress.dirty_bytes = left
                    budget = self.progress.bandwidth * (self.downtime_limit - switch_over)
                    if left <= budget and not self._worth_another_round(left, budget):
                        break
                    if self.postcopy and (
                        self.progress.round >= self.max_rounds
                        or not self._worth_another_round(left, budget)
                    ):
                        switch_to_postcopy = True  # pre-copy stopped paying
                        break
                    if self.progress.round >= self.max_rounds:
                        if left <= budget:
                            break
                        raise MigrationError(self._no_convergence())
                    if self.auto_converge and left > budget:  # (not while converging)
                        self._converge(left)
                    self._send_round(writer, bitmaps)
                self.progress.status = "completing"
                self._drain(sock)
                phases = _Phases()
                if not self.machine.pause():
                    raise MigrationError("the machine stopped during the migration")
                paused = True
                phases.end("pause")
                # What the last look found dirty, and whatever was dirtied since: sent now,
                # or with post-copy, named as what the destination lacks and sent later.
                last = _union(bitmaps, dirty.collect())
                if not switch_to_postcopy:
                    self._send_round(writer, last)
                    phases.end("last_pages")
                saved = self.machine.save()
                for state in saved.components:
                    writer.section(SectionType.COMPONENT, vmstate.encode_component(state))
                if switch_to_postcopy:
                    writer.section(SectionType.POSTCOPY, postcopy.encode_pending(last))
                    writer.flush()
                else:
                    writer.end()
                handed_over = True
                phases.end("state")
                answer = _expect(answers, sock, "resumed", "restoring the machine")
                phases.end("destination")
                phases.split_last(answer.get("phases_ms"), "destination")
                self.progress.downtime_ms = phases.total_ms
                self.progress.downtime_phases_ms = phases.ms
                dirty.stop()
                self.machine.throttle(0)
                if switch_to_postcopy:
                    pending = postcopy.Pending(last)
                    self._push_postcopy(sock, writer, answers, pending)
        except BaseException as err:
            with contextlib.suppress(Exception):
                dirty.stop()
            self.machine.throttle(0)
            self.progress.status = "failed"
            self.progress.error = _failure(self.endpoint, err)
            if pending is not None:
                sent = (
                    f"{pending.left * PAGE_SIZE >> 10} KiB of RAM not yet sent: the destination "
                    "cannot run on without it"
                    if pending.left
                    else "every page sent, but the destination did not say it had them all"
                )
                self.progress.error += (
                    f"; post-copy was under way, {sent}; this copy is older than what the "
                    "destination ran, so it stays paused: the machine is lost unless the "
                    "destination runs on"
                )
            elif handed_over and isinstance(err, _Refused):
                if was_running:  # it said it does not run the machine
                    self.machine.resume()
            elif handed_over:
                self.progress.error += (
                    "; the machine's state had been sent, so this copy stays paused: if the "
                    f"destination at {self.endpoint.uri} does not run it, resume this one "
                    "(pyvmm ctl CONTROL resume)"
                )
            elif paused and was_running:
                self.machine.resume()
            self._finish(started)
            if isinstance(err, (OSError, PyvmmError)):
                raise MigrationError(self.progress.error) from None
            raise
        finally:
            self._sock = None
        self.progress.status = "completed"
        self._finish(started)  # (before the stop: the control socket goes with the machine)
        self.machine.stop(StopReason.STOPPED, 0, f"migrated to {self.endpoint.uri}")

    def start(self) -> None:
        """Migrate on a thread of its own; the outcome is in `progress` once `done` is set."""

        def run() -> None:
            with contextlib.suppress(MigrationError):
                self.run()

        start_thread(run, "migration")

    def _finish(self, started: float) -> None:
        self.progress.seconds = time.monotonic() - started
        self.done.set()
        if self._on_end is not None:
            self._on_end(self.progress)

    # rounds

    def _send_all(self, writer: StreamWriter) -> None:
        """Round 0: every page the RAM's file has (the destination's RAM starts zeroed, so
        what was never touched, and chunks of zeros, need not be sent)."""
        started, before = time.monotonic(), writer.written
        for region in self.machine.memory.regions:
            for lo, hi in memory_file.region_extents(region):
                self._send_range(writer, region.gpa + lo, hi - lo, zeros=False)
        writer.flush()
        self._round_done(started, writer.written - before)

    def _send_round(self, writer: StreamWriter, bitmaps: list[DirtyBitmap]) -> None:
        """The pages of `bitmaps`: a guest dirties pages here and there, so short runs go many
        to a PAGE_RUNS section (a section apiece would cost more than the pages); long ones
        go as `_send_range` sends them, their chunks of zeros as ZERO_PAGES."""
        started, before = time.monotonic(), writer.written
        self._send_runs(writer, (run for bitmap in bitmaps for run in bitmap.ranges()))
        writer.flush()
        self._round_done(started, writer.written - before)

    def _send_runs(self, writer: StreamWriter, runs: Iterable[tuple[int, int]]) -> None:
        """Runs (gpa, size) of pages: the short ones many to a PAGE_RUNS section, the long
        ones as `_send_range` sends them."""
        batch = _RunBatch(writer, self._pages)
        for gpa, size in runs:
            if self._cancelled:
                raise MigrationError("cancelled: the machine is ending")
            if size >= LONG_RUN:
                self._send_range(writer, gpa, size, zeros=True)
            else:
                batch.add(gpa, size)
        batch.send()

    def _send_range(self, writer: StreamWriter, gpa: int, size: int, *, zeros: bool) -> None:
        """Send the pages of gpa..gpa+size; with `zeros`, all-zero chunks go as ZERO_PAGES (a
        page that became zero must still reach the destination), without, they are skipped."""
        for at in range(0, size, CHUNK):
            if self._cancelled:
                raise MigrationError("cancelled: the machine is ending")
            length = min(CHUNK, size - at)
            chunk = self._pages.copy(gpa + at, length)  # one copy: compared, checksummed, sent
            if self._pages.zero(length):
                if zeros:
                    writer.section(SectionType.ZERO_PAGES, _ZERO.pack(gpa + at, length))
                continue
            writer.section(SectionType.PAGES, _ADDRESS.pack(gpa + at), chunk)

    def _push_postcopy(
        self,
        sock: socket.socket,
        writer: StreamWriter,
        answers: BinaryIO,
        pending: postcopy.Pending,
    ) -> None:
        """Post-copy, once the destination runs: send the pages it lacks, those its faults ask
        for first, then END, and wait until it has them all ("complete"). The pages a guest
        dirtied last are scattered, a page or a few apiece, and the destination's cost is per
        section more than per byte: so they go PUSH_PAGES to a section. The push keeps at most
        PUSH_AHEAD bytes queued in the socket: a requested page goes out behind those only
        (the guest waits on it), not behind all that the socket's buffer could hold."""
        started, before = time.monotonic(), writer.written
        self.progress.status = "postcopy"
        self.progress.postcopy = True
        self.progress.postcopy_pages = pending.left
        heard: queue.SimpleQueue[tuple[int, int] | str | MigrationError] = queue.SimpleQueue()
        start_thread(_hear_destination, "migration-requests", answers, heard)

        def take(item: tuple[int, int] | str | MigrationError) -> list[tuple[int, int]]:
            """Act on what the destination said: the runs it asked for that are still unsent."""
            if isinstance(item, MigrationError):
                raise item
            if not isinstance(item, tuple):
                return []
            self.progress.postcopy_requested_pages += item[1]
            return pending.take_requested(*item)

        while True:
            requested: list[tuple[int, int]] = []
            while not heard.empty():
                requested += take(heard.get())
            if not requested and _queued(sock) > PUSH_AHEAD:  # wait for the link, or a request
                with contextlib.suppress(queue.Empty):
                    requested = take(heard.get(timeout=0.002))
                if not requested:
                    continue
            runs = requested or pending.take_batch(PUSH_PAGES)
            if not runs:
                break
            self._send_runs(writer, runs)
            writer.flush()
            self.progress.sent_bytes += writer.written - before
            before = writer.written
        writer.end()
        while (item := _next_heard(heard)) != "complete":
            if isinstance(item, MigrationError):
                raise item
        self.progress.sent_bytes += writer.written - before
        self.progress.postcopy_ms = round((time.monotonic() - started) * 1000, 3)

    def _drain(self, sock: socket.socket) -> None:
        """Wait, the guest still running, until the destination has read what the rounds sent
        (all but DRAINED bytes): what is still in the socket's buffers (megabytes, on TCP)
        would otherwise be read during the downtime, which the budget did not count."""
        deadline = time.monotonic() + SEND_TIMEOUT
        while (unread := _queued(sock)) > DRAINED:
            if self._cancelled:
                raise MigrationError("cancelled: the machine is ending")
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"the destination stopped reading: {unread >> 10} KiB sent to it were "
                    f"still unread after {SEND_TIMEOUT:.0f} s (the source runs on)"
                )
            time.sleep(0.001)

    def _round_done(self, started: float, sent: int) -> None:
        """`sent`: the bytes that went on the wire, so that the bandwidth is the link's, not
        how fast zero chunks are skipped."""
        seconds = max(time.monotonic() - started, 1e-6)
        if sent:
            self.progress.bandwidth = sent / seconds
        self.progress.sent_bytes += sent
        self.progress.rounds.append({"bytes": sent, "seconds": seconds})
        self.progress.round += 1

    def _worth_another_round(self, left: int, budget: float) -> bool:
        """Whether one more round, with the guest running, would shrink the pages left (and
        the downtime) by half at least: the guest dirtied them at less than half the rate
        they are sent. Not for what is already a tenth of the budget."""
        if left <= budget / 10:
            return False
        dirty_rate = left / max(self.progress.rounds[-1]["seconds"], 1e-6)
        return dirty_rate < self.progress.bandwidth / 2

    def _switch_over_estimate(self, accept_seconds: float) -> float:
        """What the downtime spends besides sending the last pages: saving and sending the
        state, and the destination restoring and starting it. The destination building its
        machine (the wait for "accept") is of that order, so that much of the limit is kept
        for it, at most half."""
        return min(accept_seconds, self.downtime_limit / 2)

    def _converge(self, dirty: int) -> None:
        """Raise the throttle if the guest dirtied more than THROTTLE_TRIGGER of what the last
        round sent (round 0, all of RAM, says nothing of the guest's pace)."""
        if self.progress.round < 2 or dirty <= THROTTLE_TRIGGER * self.progress.rounds[-1]["bytes"]:
            return
        now = self.machine.throttle_fraction
        raised = min(THROTTLE_FIRST if not now else now + THROTTLE_STEP, MAX_THROTTLE)
        self.machine.throttle(raised)
        self.progress.throttle_percent = round(raised * 100)

    def _no_convergence(self) -> str:
        dirty_rate = self.progress.dirty_bytes / max(self.progress.rounds[-1]["seconds"], 1e-6)
        if self.auto_converge:
            throttled = f" (throttled to {self.progress.throttle_percent}%)"
            remedy = "raise the downtime limit or migrate a quieter guest"
        else:
            throttled = ""
            remedy = (
                "raise the downtime limit, let the migration slow the guest down "
                "(pyvmm migrate --auto-converge) or migrate a quieter guest"
            )
        return (
            f"the guest{throttled} dirties memory about as fast as it can be sent "
            f"({dirty_rate / 1e6:.0f} MB/s dirtied, {self.progress.bandwidth / 1e6:.0f} MB/s "
            f"sent): after {self.max_rounds} rounds {self.progress.dirty_bytes >> 10} KiB were "
            f"still left, more than {self.downtime_limit * 1000:.0f} ms of downtime allows; "
            f"{remedy} (the source runs on)"
        )


class _Phases:
    """Times of consecutive phases, from when it was made."""

    def __init__(self) -> None:
        self._started = self._last = time.monotonic()
        self.ms: dict[str, float] = {}

    def end(self, name: str) -> None:
        now = time.monotonic()
        self.ms[name] = round((now - self._last) * 1000, 3)
        self._last = now

    def split_last(self, parts: object, name: str) -> None:
        """Split phase `name`, the last, by the destination's own account of its end (`parts`:
        its {"restore": ms, "postcopy": ms, "start": ms}, untrusted, ignored unless
        well-formed): what is left before them is `name`_reading (the stream still in transit
        or being read). The destination may have read the end while the source's last write
        was still returning: then its parts are scaled down to fit."""
        total = self.ms.get(name, 0.0)
        if not isinstance(parts, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1e9
            for v in parts.values()
        ):
            return
        known = {k: float(parts[k]) for k in ("restore", "postcopy", "start") if k in parts}
        if not known:
            return
        scale = min(1.0, total / sum(known.values())) if sum(known.values()) else 1.0
        del self.ms[name]
        self.ms[f"{name}_reading"] = round(max(total - sum(known.values()), 0.0), 3)
        for key, value in known.items():
            self.ms[f"{name}_{key}"] = round(value * scale, 3)

    @property
    def total_ms(self) -> float:
        return (self._last - self._started) * 1000


@contextlib.contextmanager
def _connection(endpoint: Endpoint) -> Iterator[socket.socket]:
    """The connection to the destination; shut down on the way out, so the destination sees
    the end at once (files made from the socket would otherwise keep it open)."""
    sock = endpoint.connect(SEND_TIMEOUT)
    try:
        yield sock
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def _union(first: list[DirtyBitmap], second: list[DirtyBitmap]) -> list[DirtyBitmap]:
    earlier = {bitmap.gpa: bitmap for bitmap in first}
    return [earlier[b.gpa] | b if b.gpa in earlier else b for b in second]


class _PageCopy:
    """The sender's copy of the pages it sends next, at most CHUNK bytes, made and compared to
    zeros with the GIL released (GuestMemory.copy_out, memcmp): the guest runs meanwhile, and
    its vCPU threads need the GIL for every exit pyvmm handles. A copy, because the section's
    checksum must be of the bytes sent; valid until the next copy."""

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self._buffer = (ctypes.c_char * CHUNK)()
        self._address = ctypes.addressof(self._buffer)
        self._view = memoryview(self._buffer).cast("B")

    def copy(self, gpa: int, length: int, at: int = 0) -> memoryview:
        """Guest RAM at gpa..gpa+length, copied to `at` in the buffer: that part of it."""
        self._memory.copy_out(gpa, self._address + at, length)
        return self._view[at : at + length]

    def first(self, length: int) -> memoryview:
        return self._view[:length]

    def zero(self, length: int) -> bool:
        """Whether the buffer's first `length` bytes are all zero."""
        return libc.memcmp(self._address, _ZERO_CHUNK, length) == 0


class _RunBatch:
    """Short runs of pages gathered into PAGE_RUNS sections: u32 count, count x (u64 address,
    u32 pages), then the runs' pages one after another."""

    def __init__(self, writer: StreamWriter, pages: _PageCopy) -> None:
        self._writer = writer
        self._pages = pages
        self._runs: list[tuple[int, int]] = []
        self._size = 0

    def add(self, gpa: int, size: int) -> None:
        if self._size + size > CHUNK or len(self._runs) == MAX_RUNS:
            self.send()
        self._runs.append((gpa, size))
        self._size += size

    def send(self) -> None:
        if not self._runs:
            return
        # One copy of the pages (the guest may be running): checksummed and sent as it is.
        at = 0
        for gpa, size in self._runs:
            self._pages.copy(gpa, size, at)
            at += size
        head = _RUN_COUNT.pack(len(self._runs))
        head += b"".join(_RUN.pack(gpa, size // PAGE_SIZE) for gpa, size in self._runs)
        self._writer.section(SectionType.PAGE_RUNS, head, self._pages.first(at))
        self._runs, self._size = [], 0


def _hear_destination(answers: BinaryIO, heard: queue.SimpleQueue[Any]) -> None:
    """Post-copy, at the source: the destination's lines, each to `heard` as a requested
    (gpa, pages), "complete", or a MigrationError (its error, a malformed line, or the end of
    the connection, after which nothing more comes)."""
    try:
        while line := answers.readline(1 << 16):
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if isinstance(message, dict) and message.get("complete") is True:
                heard.put("complete")
                continue
            if isinstance(message, dict) and set(message) == {"awaiting"}:
                continue  # still waiting: the destination is there
            runs = message.get("pages") if isinstance(message, dict) else None
            if not isinstance(runs, list) or not all(_is_run(run) for run in runs):
                error = message.get("error") if isinstance(message, dict) else None
                heard.put(MigrationError(f"the destination said {error or line[:200]!r}"))
                return
            for gpa, pages in runs:
                heard.put((gpa, pages))
        heard.put(MigrationError("the destination closed the connection during post-copy"))
    except OSError as err:
        heard.put(MigrationError(f"the connection broke during post-copy: {err.strerror or err}"))


def _is_run(run: object) -> bool:
    return (
        isinstance(run, list)
        and len(run) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in run)
        and run[0] >= 0
        and run[0] % PAGE_SIZE == 0
        and 0 < run[1] <= MAX_REQUESTED_PAGES
    )


def _queued(sock: socket.socket) -> int:
    """Bytes sent on `sock` that the peer has not read yet (still in the socket's buffers)."""
    buffer = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buffer)
    return int.from_bytes(buffer, sys.byteorder)


def _next_heard(heard: queue.SimpleQueue[Any]) -> Any:
    try:
        return heard.get(timeout=REPLY_TIMEOUT)
    except queue.Empty:
        return MigrationError(
            f"the destination did not say within {REPLY_TIMEOUT:.0f} s that it has every page"
        )


class _Refused(MigrationError):
    """The destination answered with an error: it does not run the machine."""


def _expect(answers: BinaryIO, sock: socket.socket, key: str, doing: str) -> dict[str, Any]:
    """Wait for the destination's {key: true, ...} and return it; MigrationError with its
    error otherwise."""
    sock.settimeout(REPLY_TIMEOUT)
    try:
        line = answers.readline(1 << 16)
    except TimeoutError:
        raise MigrationError(
            f"the destination did not answer within {REPLY_TIMEOUT:.0f} s ({doing})"
        ) from None
    finally:
        sock.settimeout(SEND_TIMEOUT)
    if not line:
        raise MigrationError(f"the destination closed the connection ({doing})")
    try:
        answer = json.loads(line)
    except ValueError:
        raise MigrationError("the destination answered with something that is not JSON") from None
    if not isinstance(answer, dict) or answer.get(key) is not True:
        error = answer.get("error") if isinstance(answer, dict) else None
        raise _Refused(f"the destination refused: {error or answer}")
    return answer


def _failure(endpoint: Endpoint, err: BaseException) -> str:
    if isinstance(err, PyvmmError):
        return str(err)
    if not isinstance(err, OSError):
        return f"the migration failed: {type(err).__name__}: {err}"
    if isinstance(err, TimeoutError):
        return f"sending to {endpoint.uri} timed out: the destination stopped reading"
    if isinstance(err, (BrokenPipeError, ConnectionResetError)):
        return f"the connection to {endpoint.uri} broke (did the destination end?)"
    return f"the migration to {endpoint.uri} failed: {err.strerror or err}"


# the destination


@dataclass
class Incoming:
    """A machine received from a migration, restored, paused and not yet started (its devices
    take no host input yet: a tap's frames still go to the source): `start()` it, then
    `confirm()` so that the source stops. After a switch to post-copy (`postcopy`), its RAM
    still comes in, on a thread of its own from `confirm()` on; should the source be lost
    before it is all in, the machine stops with the error."""

    machine: Machine
    info: dict[str, Any]
    _sock: socket.socket
    restore_seconds: float = 0.0  # from the stream's END to the machine restored
    _restored_at: float = field(default_factory=time.monotonic)
    postcopy: _PostcopyIn | None = None
    postcopy_seconds: float = 0.0  # then setting post-copy up (its RAM dropped, registered)

    def start(self) -> None:
        """Start the machine and let it run (its devices take host input from now on)."""
        self.machine.start()
        self.machine.resume()

    def confirm(self) -> None:
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
                self.postcopy.confirm(resumed)
                return
            self._sock.sendall(_line(resumed))
        except OSError as err:
            if self.postcopy is not None:
                self.postcopy.destination.fail("the source went away as post-copy began")
            raise MigrationError(
                f"the source went away before it heard that this copy runs ({err.strerror}); "
                "this copy stops, the source's stays paused"
            ) from None
        finally:
            if self.postcopy is None:
                self._sock.close()


class _PostcopyIn:
    """The destination's side of post-copy: the fault server (postcopy.Destination), the
    requests it sends the source (held back until "resumed" has gone: the source reads that
    first), and the thread reading the rest of the stream."""

    def __init__(
        self, machine: Machine, pending: bytes, sock: socket.socket, reader: StreamReader
    ) -> None:
        self.machine = machine
        self._sock = sock
        self._reader = reader
        self._lock = threading.Lock()
        self._held: list[dict[str, object]] | None = []  # None once "resumed" went

        def lost(why: str) -> None:
            machine.stop(StopReason.ERROR, 1, why)

        bitmaps = postcopy.decode_pending(pending, machine.memory)
        self.destination = postcopy.Destination(machine.memory, bitmaps, self._send, lost)
        machine.on_close(self._machine_closed)

    def _machine_closed(self) -> None:
        """Closed before every page came (its user quit it): the source hears the end."""
        self.destination.close()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _send(self, message: dict[str, object]) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append(message)
                return
            _answer(self._sock, message)  # (on a broken link, the reading thread fails)

    def confirm(self, resumed: dict[str, Any]) -> None:
        with self._lock:
            self._sock.sendall(_line(resumed))
            held, self._held = self._held or [], None
            for message in held:
                self._sock.sendall(_line(message))
        self.destination.start()
        start_thread(self._receive, "postcopy-pages")

    def _receive(self) -> None:
        destination = self.destination
        try:
            for section in self._reader.sections():
                if section.type not in _PAGE_SECTIONS:
                    raise StreamError(f"{_where(self._reader.what, section)} is out of place")
                writes = _page_writes(section)
                if section.type == SectionType.ZERO_PAGES:
                    ((gpa, zeros),) = writes
                    destination.fill_zeros(gpa, len(zeros))
                else:
                    destination.fill(writes)
            destination.complete()
            with self._lock:
                self._sock.sendall(_line({"complete": True}))
        except (StreamError, _Malformed, postcopy.PostcopyError, GuestMemoryError, OSError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            destination.fail(
                f"post-copy migration: the source is lost with "
                f"{destination.awaited * PAGE_SIZE >> 10} KiB of RAM not sent ({reason}): "
                "this machine cannot run on without it"
            )
        finally:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()


def _line(message: dict[str, object]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def receive(
    endpoint: Endpoint,
    console: Callable[[dict[str, Any]], Console],
    *,
    expect: Callable[[MachineConfig], str] | None = None,
    trace_exits: bool = False,
    on_listening: Callable[[], None] | None = None,
) -> Incoming:
    """Wait for one migration at `endpoint` and take it in. `console(info)` opens the machine's
    console, knowing where the source's went (`info["console"]`); `expect(config)` says what
    is wrong with the incoming configuration for this destination ("" if nothing). A problem
    is sent to the source as a refusal, and raised here."""
    listener = endpoint.listen()
    try:
        if on_listening is not None:
            on_listening()
        sock = _first_speaker(listener)
        endpoint.no_delay(sock)
    finally:
        listener.close()
        if endpoint.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                os.unlink(str(endpoint.address))
    try:
        return take_in(sock, endpoint, console, expect=expect, trace_exits=trace_exits)
    except BaseException:
        sock.close()
        raise


def _first_speaker(listener: socket.socket) -> socket.socket:
    """The first connection that sends something: one that closes without a word (another
    pyvmm asking whether this socket is live, sockets.py) is not the source."""
    while True:
        sock, _ = listener.accept()
        sock.settimeout(REPLY_TIMEOUT)
        try:
            if sock.recv(1, socket.MSG_PEEK):
                return sock
        except OSError:
            pass
        sock.close()


def take_in(
    sock: socket.socket,
    endpoint: Endpoint,
    console: Callable[[dict[str, Any]], Console],
    *,
    expect: Callable[[MachineConfig], str] | None = None,
    trace_exits: bool = False,
) -> Incoming:
    """Take in the migration a source sends on the connected `sock` (see `receive`; `endpoint`
    names the source's address in messages)."""
    what = f"the migration stream from {endpoint.uri}"
    sock.settimeout(REPLY_TIMEOUT)  # a source that stalls this long has gone
    stream = sock.makefile("rb", buffering=1 << 20)
    try:
        reader = StreamReader(stream, what)
        config = vmstate.decode_config(reader.next(), what)
        section = reader.next_known()
        if section.type != SectionType.INFO:
            raise StreamError(f"{what}: the configuration is not followed by INFO")
        info = vmstate.decode_info(section, what)
        problem = expect(config) if expect is not None else ""
        if problem:
            _answer(sock, {"error": problem})
            raise MigrationError(f"refused the incoming machine: {problem}")
        try:
            machine = Machine.from_config(config, console(info), trace_exits=trace_exits)
        except (PyvmmError, OSError) as err:
            _answer(sock, {"error": f"cannot build the machine: {err}"})
            raise
        machine.pause()  # not started: it will start paused, its devices quiet
        machine.components.prepare_restore()  # (now: not in the downtime)
        _answer(sock, {"accept": True, **_postcopy_ability(machine)})
    except StreamError as err:
        _answer(sock, {"error": str(err)})
        raise
    except OSError as err:
        raise MigrationError(f"{what} broke: {err.strerror or err}") from None
    try:
        components, pending = _read_body(reader, machine, what)
        ended = time.monotonic()
    except OSError as err:
        machine.close()
        raise MigrationError(f"{what} broke: {err.strerror or err}") from None
    except StateError as err:
        machine.close()
        _answer(sock, {"error": str(err)})
        raise MigrationError(str(err)) from None
    except BaseException:
        machine.close()
        raise
    try:
        machine.restore(SavedMachine(config, components))
        restored = time.monotonic()
    except (StateError, OSError, KvmError) as err:  # (the kernel refused a part: source runs on)
        machine.close()
        why = str(err) if isinstance(err, StateError) else f"restoring the machine failed: {err}"
        _answer(sock, {"error": why})
        raise MigrationError(why) from None
    except BaseException:
        machine.close()
        raise
    postcopy_in = None
    if pending is not None:
        try:
            postcopy_in = _PostcopyIn(machine, pending, sock, reader)
        except (postcopy.PostcopyError, OSError, KvmError) as err:  # (refused: the source runs on)
            machine.close()
            why = f"cannot take the post-copy in: {err}"
            _answer(sock, {"error": why})
            raise MigrationError(why) from None
        except BaseException:
            machine.close()
            raise
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
            done[first:last] = _ONES[: last - first]


def _read_body(
    reader: StreamReader, machine: Machine, what: str
) -> tuple[list[SavedState], bytes | None]:
    """The pages and the components' states, up to END; or up to POSTCOPY, whose payload
    (the pages this machine lacks) is returned with them."""
    components: list[SavedState] = []
    memory = machine.memory
    pre_fault = _PreFaults(machine)
    for section in reader.sections():
        kind = section.type
        try:
            if kind in _PAGE_SECTIONS and not components:
                zeros = kind == SectionType.ZERO_PAGES
                for gpa, pages in _page_writes(section):
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
            elif kind == SectionType.COMPONENT:
                components.append(vmstate.decode_component(section, what))
            elif kind == SectionType.POSTCOPY and components:
                return components, section.payload
            else:
                raise StreamError(f"{_where(what, section)} is out of place")
        except GuestMemoryError as err:
            raise StreamError(f"{_where(what, section)} has pages outside RAM ({err})") from None
        except _Malformed as err:
            raise StreamError(f"{_where(what, section)} is malformed ({err})") from None
    return components, None


_PAGE_SECTIONS = (SectionType.PAGES, SectionType.ZERO_PAGES, SectionType.PAGE_RUNS)


class _Malformed(Exception):
    """A page section of the wrong shape (said with the section's place, by the caller)."""


def _where(what: str, section: Section) -> str:
    return f"{what}: the {section_name(section.type)} section at byte {section.offset}"


def _page_writes(section: Section) -> list[tuple[int, memoryview | bytes]]:
    """The (address, bytes) writes of a PAGES, ZERO_PAGES or PAGE_RUNS section, all checked
    for shape before any is made: pages whole and aligned, at most CHUNK bytes a section."""
    payload = section.payload
    if section.type == SectionType.PAGES and len(payload) >= _ADDRESS.size:
        (gpa,) = _ADDRESS.unpack_from(payload)
        writes = [(gpa, memoryview(payload)[_ADDRESS.size :])]
    elif section.type == SectionType.ZERO_PAGES and len(payload) == _ZERO.size:
        gpa, size = _ZERO.unpack(payload)
        if size > CHUNK:
            raise _Malformed(f"zero pages are at most {CHUNK >> 20} MiB a section")
        writes = [(gpa, _ZERO_CHUNK[:size])]
    elif section.type == SectionType.PAGE_RUNS and len(payload) >= _RUN_COUNT.size:
        writes = _runs(memoryview(payload))
    else:
        raise _Malformed("too short for its type")
    if not 0 < sum(len(data) for _, data in writes) <= CHUNK:
        raise _Malformed(f"a section holds some pages, at most {CHUNK >> 20} MiB")
    for gpa, data in writes:
        if gpa % PAGE_SIZE or not data or len(data) % PAGE_SIZE:
            raise _Malformed("pages are whole and page-aligned")
    return writes


def _runs(payload: memoryview) -> list[tuple[int, memoryview]]:
    (count,) = _RUN_COUNT.unpack_from(payload)
    table_end = _RUN_COUNT.size + count * _RUN.size
    if not 0 < count <= MAX_RUNS or table_end > len(payload):
        raise _Malformed(f"1 to {MAX_RUNS} runs, each with its address and length")
    writes, at = [], table_end
    for gpa, pages in _RUN.iter_unpack(payload[_RUN_COUNT.size : table_end]):
        writes.append((gpa, payload[at : at + pages * PAGE_SIZE]))
        at += pages * PAGE_SIZE
    if at != len(payload):
        raise _Malformed("its runs' pages are not the bytes that follow them")
    return writes


def _answer(sock: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(_line(message))
