"""Post-copy on the migration's connection: the source's push of the pages the destination
lacks, with the pages its faults ask for first, and the destination's side of it (postcopy.py
has the protocol and each side's bookkeeping)."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
from typing import Any, BinaryIO

from pyvmm.board.machine import Machine, StopReason
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.machine.memory import GuestMemoryError
from pyvmm.machine.threads import start_thread
from pyvmm.migration import postcopy, transport
from pyvmm.migration.pages import PAGE_SECTIONS, Malformed, PageSender, page_writes, where
from pyvmm.migration.progress import Progress
from pyvmm.migration.sockets import json_line
from pyvmm.migration.stream import SectionType, StreamError, StreamReader, StreamWriter
from pyvmm.migration.transport import MigrationError, answer, queued

PUSH_PAGES = 32  # pages per section of post-copy's push (a run of them or many runs)
PUSH_AHEAD = 64 << 10  # bytes post-copy's push keeps queued in the socket at most
MAX_REQUESTED_PAGES = 1 << 18  # pages one post-copy request may ask for (1 GiB)

_Heard = tuple[int, int] | str | MigrationError


# the source


def push(
    sock: socket.socket,
    writer: StreamWriter,
    answers: BinaryIO,
    pending: postcopy.Pending,
    sender: PageSender,
    progress: Progress,
) -> None:
    """Once the destination runs: send the pages it lacks, those its faults ask for first, then
    END, and wait until it has them all ("complete"). The pages a guest dirtied last are
    scattered, a page or a few apiece, and the destination's cost is per section more than per
    byte: so they go PUSH_PAGES to a section. The push keeps at most PUSH_AHEAD bytes queued in
    the socket: a requested page goes out behind those only (the guest waits on it), not behind
    all that the socket's buffer could hold."""
    started, before = time.monotonic(), writer.written
    progress.status = "postcopy"
    progress.postcopy = True
    progress.postcopy_pages = pending.left
    heard: queue.SimpleQueue[_Heard] = queue.SimpleQueue()
    start_thread(_read_requests, "migration-requests", answers, heard)

    def take(item: _Heard) -> list[tuple[int, int]]:
        """Act on what the destination said: the runs it asked for that are still unsent."""
        if isinstance(item, MigrationError):
            raise item
        if not isinstance(item, tuple):
            return []
        progress.postcopy_requested_pages += item[1]
        return pending.take_requested(*item)

    while True:
        requested: list[tuple[int, int]] = []
        while not heard.empty():
            requested += take(heard.get())
        if not requested and queued(sock) > PUSH_AHEAD:  # wait for the link, or a request
            with contextlib.suppress(queue.Empty):
                requested = take(heard.get(timeout=0.002))
            if not requested:
                continue
        runs = requested or pending.take_batch(PUSH_PAGES)
        if not runs:
            break
        sender.send_runs(writer, runs)
        writer.flush()
        progress.sent_bytes += writer.written - before
        before = writer.written
    writer.end()
    while (item := _next_heard(heard)) != "complete":
        if isinstance(item, MigrationError):
            raise item
    progress.sent_bytes += writer.written - before
    progress.postcopy_ms = round((time.monotonic() - started) * 1000, 3)


def _read_requests(answers: BinaryIO, heard: queue.SimpleQueue[_Heard]) -> None:
    """The destination's lines, each to `heard` as a requested (gpa, pages), "complete", or a
    MigrationError (its error, a malformed line, or the end of the connection, after which
    nothing more comes)."""
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


def _next_heard(heard: queue.SimpleQueue[_Heard]) -> _Heard:
    try:
        return heard.get(timeout=transport.REPLY_TIMEOUT)
    except queue.Empty:
        return MigrationError(
            f"the destination did not say within {transport.REPLY_TIMEOUT:.0f} s that it has "
            "every page"
        )


# the destination


class PostcopyIn:
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
            answer(self._sock, message)  # (on a broken link, the reading thread fails)

    def report_running(self, resumed: dict[str, Any]) -> None:
        """Send "resumed", then the requests held back until it went, and take pages in."""
        with self._lock:
            self._sock.sendall(json_line(resumed))
            held, self._held = self._held or [], None
            for message in held:
                self._sock.sendall(json_line(message))
        self.destination.start()
        start_thread(self._receive, "postcopy-pages")

    def fail(self, why: str) -> None:
        self.destination.fail(why)

    def _receive(self) -> None:
        destination = self.destination
        try:
            for section in self._reader.sections():
                if section.type not in PAGE_SECTIONS:
                    raise StreamError(f"{where(self._reader.what, section)} is out of place")
                writes = page_writes(section)
                if section.type == SectionType.ZERO_PAGES:
                    ((gpa, zeros),) = writes
                    destination.fill_zeros(gpa, len(zeros))
                else:
                    destination.fill(writes)
            destination.complete()
            with self._lock:
                self._sock.sendall(json_line({"complete": True}))
        except (StreamError, Malformed, postcopy.PostcopyError, GuestMemoryError, OSError) as err:
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


def pages_lost_message(pending: postcopy.Pending) -> str:
    """What a source says of a post-copy that failed with `pending` pages still to send."""
    sent = (
        f"{pending.left * PAGE_SIZE >> 10} KiB of RAM not yet sent: the destination cannot run "
        "on without it"
        if pending.left
        else "every page sent, but the destination did not say it had them all"
    )
    return (
        f"; post-copy was under way, {sent}; this copy is older than what the destination ran, "
        "so it stays paused: the machine is lost unless the destination runs on"
    )
