"""Live migration's source: iterative pre-copy of a running machine to another pyvmm.

The source sends one VM state stream (stream.py) and the destination (destination.py) answers on
the same socket with JSON lines (transport.py):

    source                                      destination (pyvmm run --incoming URI)
    header, CONFIG, INFO                 ->
                                         <-     {"accept": true} | {"error": "why"}
    PAGES / ZERO_PAGES / PAGE_RUNS: all RAM (round 0), then each round the pages dirtied since,
    each round followed by DEVICE_DATA (devices saving ahead,
    named by SAVING_AHEAD before round 0)
                                         <-     {"switchover_ack": true} (devices saving ahead)
    (the machine paused) last dirty pages, DEVICE_STATE*, COMPONENT*, END
                                         <-     {"resumed": true, "phases_ms": ...} | {"error": ..}

The page sections are pages.py's, the devices' data sent ahead and the switch-over acknowledgement
device_precopy.py's; when the rounds end, and how a guest that dirties too fast is slowed down,
is convergence.py's. Then the source pauses, sends the rest and the machine's
state, and waits for the destination to say that its copy runs; only then does the source
stop. Anything failing before the destination's "resumed" (a cut connection, a refusal, a
timeout) resumes the source, which never stopped being the machine; so does a destination's
refusal of the state it was sent (it says it does not run it). With post-copy (postcopy.py), the
pause comes with pages still to send: the state goes with the list of them (POSTCOPY), the
destination runs, and the pages follow (postcopy_link.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from pyvmm.board.devices import pins_guest_ram
from pyvmm.board.machine import Machine, RunState, StopReason
from pyvmm.errors import PyvmmError
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.machine.dirty import DirtyBitmap
from pyvmm.machine.threads import start_thread
from pyvmm.migration import machine_sections, memory_file, postcopy, postcopy_link, transport
from pyvmm.migration.convergence import Convergence, Step
from pyvmm.migration.device_precopy import DevicePrecopy, send_stopped_states
from pyvmm.migration.pages import PageSender, union
from pyvmm.migration.progress import Phases, Progress
from pyvmm.migration.stream import SectionType, StreamWriter
from pyvmm.migration.transport import Endpoint, MigrationError, Refused, connection, expect, queued

log = logging.getLogger(__name__)

DRAINED = 64 << 10  # bytes left unread in the socket when the source pauses, at most
POSTCOPY_WITH_DEVICE = (
    "post-copy cannot take a passed-through device: its state must be loaded, and its DMA "
    "mapping pins all of guest RAM, before the destination runs, so nothing could be left to "
    "come later (QEMU refuses it too); migrate without --postcopy"
)
REFUSAL_WAIT = 1.0  # seconds to look for the destination's refusal after a failed send
INITIAL_READ_GAP = 0.01  # seconds between reads of devices' initial bytes not out yet


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
        self.progress = Progress(ram_bytes=machine.memory.size)
        self.convergence = Convergence(
            self.progress,
            machine.throttle,
            downtime_limit=downtime_limit,
            max_rounds=max_rounds,
            auto_converge=auto_converge,
            postcopy=postcopy,
        )
        self.done = threading.Event()
        self._on_end = on_end
        self._cancelled = False
        self._running = False  # run() has begun
        self._sock: socket.socket | None = None
        self._sender = PageSender(machine.memory, self._check_cancelled)
        # how far it got, for what a failure leaves behind
        self._paused = False
        self._handed_over = False  # the state went to the destination
        self._pending: postcopy.Pending | None = None  # post-copy's pages still to send
        self._devices = DevicePrecopy({})  # the devices that save ahead (once it starts)

    def cancel(self) -> None:
        """End a migration under way and wait until it has (the machine is going away): it
        fails at its next batch, its connection shut down so that no send blocks it."""
        self._cancelled = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._running:
            self.done.wait(transport.SEND_TIMEOUT)

    def start(self) -> None:
        """Migrate on a thread of its own; the outcome is in `progress` once `done` is set."""

        def run() -> None:
            with contextlib.suppress(MigrationError):
                self.run()

        start_thread(run, "migration")

    def run(self) -> None:
        """Migrate now, on this thread (not a vCPU's); MigrationError if it fails. A failure
        leaves the source as it was (running, or paused if it was), except once the machine's
        state has gone to the destination and it did not refuse it: then it stays paused,
        since the destination may be running it (and is, after a switch to post-copy)."""
        self._running = True
        started = time.monotonic()
        self._refuse_unmigratable(started)
        was_running = self.machine.state is RunState.RUNNING
        try:
            with connection(self.endpoint) as sock:
                self._sock = sock
                answers = sock.makefile("rb")
                try:
                    self._migrate(sock, answers)
                except (OSError, MigrationError) as err:
                    if not isinstance(err, Refused) and (refusal := _refusal(sock, answers)):
                        raise refusal from None
                    raise
        except BaseException as err:
            self._recover(err, was_running)
            self._finish(started)
            if isinstance(err, (OSError, PyvmmError)):
                raise MigrationError(self.progress.error) from None
            raise
        finally:
            self._sock = None
        self.progress.status = "completed"
        self._finish(started)  # (before the stop: the control socket goes with the machine)
        self.machine.stop(StopReason.STOPPED, 0, f"migrated to {self.endpoint.uri}")

    def _refuse_unmigratable(self, started: float) -> None:
        """A machine with a part that cannot migrate (and the destination could not open a
        device while this one has it) is refused before anything is sent."""
        caveats = self.machine.components.caveats()
        if self.machine.memory.missing:
            caveats = {"its RAM": self.machine.memory.missing}
        pinning = [d for d in self.machine.config.devices if pins_guest_ram(d.kind)]
        if self.convergence.postcopy and pinning and not caveats:
            caveats = {f"slot {pinning[0].slot} ({pinning[0].kind})": POSTCOPY_WITH_DEVICE}
        if caveats:
            first, caveat = next(iter(caveats.items()))
            self.progress.status, self.progress.error = "failed", f"{first}: {caveat}"
            self._finish(started)
            raise MigrationError(f"cannot migrate this machine: {first}: {caveat}")

    def _migrate(self, sock: socket.socket, answers: BinaryIO) -> None:
        out = sock.makefile("wb", buffering=1 << 20)
        writer = StreamWriter(out)
        writer.section(SectionType.CONFIG, machine_sections.encode_config(self.machine.config))
        writer.section(SectionType.INFO, machine_sections.encode_info(self.info))
        asked = time.monotonic()
        out.flush()
        accepted = expect(answers, sock, "accept", "building its machine")
        if self.convergence.postcopy and accepted.get("postcopy") is not True:
            why = accepted.get("postcopy_unavailable") or "it does not say it can"
            raise MigrationError(
                f"the destination cannot take a post-copy migration ({why}); migrate "
                "without post-copy (the source runs on)"
            )
        self.convergence.destination_built(time.monotonic() - asked)
        self.progress.status = "active"
        self.machine.dirty.start()
        if self.machine.state is RunState.RUNNING:  # (a paused machine's devices stay stopped)
            self._devices = DevicePrecopy(self.machine.components.precopy_parts())
            self._devices.begin(writer)
        bitmaps, step = self._precopy(writer)
        self.progress.status = "completing"
        self._drain(sock)
        self._switch_over(sock, writer, answers, bitmaps, step)
        if self._pending is not None:
            postcopy_link.push(sock, writer, answers, self._pending, self._sender, self.progress)

    def _precopy(self, writer: StreamWriter) -> tuple[list[DirtyBitmap], Step]:
        """Round 0, then rounds of dirty pages until the policy says to stop: what the last
        look at the dirty log found, and how the migration goes on."""
        self._send_all(writer)
        while True:
            bitmaps = self.machine.dirty.collect()
            left = sum(bitmap.count() for bitmap in bitmaps) * PAGE_SIZE
            self.progress.dirty_bytes = left
            left += self._devices.stop_copy_bytes()
            step = self.convergence.next_step(left)
            if step is not Step.ROUND:
                return bitmaps, step
            self._send_round(writer, bitmaps)

    def _switch_over(
        self,
        sock: socket.socket,
        writer: StreamWriter,
        answers: BinaryIO,
        bitmaps: list[DirtyBitmap],
        step: Step,
    ) -> None:
        """The downtime: pause, send the last pages (or, for post-copy, name them) and the
        state, and wait until the destination runs."""
        self._await_switchover_ack(sock, writer, answers)
        phases = Phases()
        if not self.machine.pause():
            raise MigrationError("the machine stopped during the migration")
        self._paused = True
        self.convergence.end()  # (a throttle would go on kicking vCPUs that are parked)
        phases.end("pause")
        # What the last look found dirty, and whatever was dirtied since: sent now, or with
        # post-copy, named as what the destination lacks and sent later.
        last = union(bitmaps, self.machine.dirty.collect())
        if step is Step.SWITCH_OVER:
            self._send_round(writer, last, last=True)
            phases.end("last_pages")
        self.progress.device_state_bytes = send_stopped_states(writer, self.machine.components)
        saved = self.machine.save()
        for state in saved.components:
            writer.section(SectionType.COMPONENT, machine_sections.encode_component(state))
        if step is Step.POSTCOPY:
            writer.section(SectionType.POSTCOPY, postcopy.encode_pending(last))
            writer.flush()
        else:
            writer.end()
        self._handed_over = True
        phases.end("state")
        reply = expect(answers, sock, "resumed", "restoring the machine")
        phases.end("destination")
        phases.split_last(reply.get("phases_ms"), "destination")
        self.progress.downtime_ms = phases.total_ms
        self.progress.downtime_phases_ms = phases.ms
        self._stop_logging()  # (the destination runs the machine now: nothing may fail it)
        if step is Step.POSTCOPY:
            self._pending = postcopy.Pending(last)

    def _await_switchover_ack(
        self, sock: socket.socket, writer: StreamWriter, answers: BinaryIO
    ) -> None:
        """With devices saving ahead: their initial bytes all sent (more reads if a device
        still had some), then the destination's word that it has loaded them."""
        if not self._devices.parts:
            return
        deadline = time.monotonic() + transport.REPLY_TIMEOUT
        while not self._devices.initial_sent:
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"the devices' initial data did not end within {transport.REPLY_TIMEOUT:.0f} "
                    "s (the source runs on)"
                )
            time.sleep(INITIAL_READ_GAP)
            self._devices.send(writer)
        writer.flush()
        asked = time.monotonic()
        expect(answers, sock, "switchover_ack", "loading the devices' initial data")
        self.progress.switchover_ack_ms = round((time.monotonic() - asked) * 1000, 3)
        self.progress.switchover_acked = True
        log.info("switch-over acknowledged by the destination")

    def _stop_logging(self) -> None:
        try:
            self.machine.dirty.stop()
        except Exception as err:  # (a DMA source whose device would not go back, say)
            log.warning("the dirty log did not stop cleanly after the migration: %s", err)

    def _recover(self, err: BaseException, was_running: bool) -> None:
        """After a failure: the guest at full speed, the reason in `progress`, and the source
        running again if the destination cannot be running the machine."""
        self._stop_logging()
        self.convergence.end()
        self.progress.status = "failed"
        self.progress.error = _failure(self.endpoint, err)
        if self._pending is not None:
            self.progress.error += postcopy_link.pages_lost_message(self._pending)
        elif self._handed_over and isinstance(err, Refused):
            if was_running:  # it said it does not run the machine
                self.machine.resume()
        elif self._handed_over:
            self.progress.error += (
                "; the machine's state had been sent, so this copy stays paused: if the "
                f"destination at {self.endpoint.uri} does not run it, resume this one "
                "(pyvmm ctl CONTROL resume)"
            )
        elif self._paused and was_running:
            self.machine.resume()  # (its devices come back from STOP_COPY with it)
        if not self._paused:
            self._devices.abort()

    def _finish(self, started: float) -> None:
        self.progress.seconds = time.monotonic() - started
        self.done.set()
        if self._on_end is not None:
            self._on_end(self.progress)

    def _check_cancelled(self) -> None:
        if self._cancelled:
            raise MigrationError("cancelled: the machine is ending")

    # rounds

    def _send_all(self, writer: StreamWriter) -> None:
        """Round 0: every page the RAM's file has (the destination's RAM starts zeroed, so
        what was never touched, and chunks of zeros, need not be sent)."""
        started, before = time.monotonic(), writer.written
        for region in self.machine.memory.regions:
            for lo, hi in memory_file.region_extents(region):
                self._sender.send_range(writer, region.gpa + lo, hi - lo, zeros=False)
        self._send_devices(writer)
        writer.flush()
        self.progress.round_done(time.monotonic() - started, writer.written - before)

    def _send_round(
        self, writer: StreamWriter, bitmaps: list[DirtyBitmap], *, last: bool = False
    ) -> None:
        """The pages of `bitmaps`: a guest dirties pages here and there, so short runs go many
        to a PAGE_RUNS section (a section apiece would cost more than the pages); long ones
        go as PageSender.send_range sends them, their chunks of zeros as ZERO_PAGES. Then what
        the devices saving ahead have, but not in the `last` round (they have stopped: what
        is left of theirs goes with their state)."""
        started, before = time.monotonic(), writer.written
        self._sender.send_bitmaps(writer, bitmaps)
        if not last:
            self._send_devices(writer)
        writer.flush()
        self.progress.round_done(time.monotonic() - started, writer.written - before)

    def _send_devices(self, writer: StreamWriter) -> None:
        self._devices.send(writer)
        self.progress.device_precopy_bytes = self._devices.sent_bytes

    def _drain(self, sock: socket.socket) -> None:
        """Wait, the guest still running, until the destination has read what the rounds sent
        (all but DRAINED bytes): what is still in the socket's buffers (megabytes, on TCP)
        would otherwise be read during the downtime, which the budget did not count."""
        deadline = time.monotonic() + transport.SEND_TIMEOUT
        while (unread := queued(sock)) > DRAINED:
            self._check_cancelled()
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"the destination stopped reading: {unread >> 10} KiB sent to it were "
                    f"still unread after {transport.SEND_TIMEOUT:.0f} s (the source runs on)"
                )
            time.sleep(0.001)


def _refusal(sock: socket.socket, answers: BinaryIO) -> Refused | None:
    """The destination's refusal, if one is waiting: a destination that refuses while this side
    still sends (data it could not take) answers, then stops reading, so the send fails or
    times out before the answer is read; the answer is the reason to give."""
    with contextlib.suppress(OSError, ValueError):
        sock.settimeout(REFUSAL_WAIT)
        while line := answers.readline(1 << 16):  # (after a switchover_ack, say)
            reply = json.loads(line)
            if isinstance(reply, dict) and reply.get("error"):
                return Refused(f"the destination refused: {reply['error']}")
    return None


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
