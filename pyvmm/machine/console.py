"""Where the guest's serial console goes: stdio, a file, a UNIX socket, or a capture buffer.

`open_console("stdio" | "file:PATH" | "socket:PATH")` parses the CLI's --console option.
A console may also feed input to the guest: stdio when stdin is a terminal or pipe, and sockets.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import sys
import threading
import time
from collections.abc import Callable

from pyvmm.errors import ConfigError
from pyvmm.machine.threads import start_thread


class Console:
    """Output sink for guest console bytes; optionally a source of input bytes."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def input_fd(self) -> int | None:
        """A readable fd whose bytes are guest input, or None."""
        return None

    def close(self) -> None:
        pass


class ConsoleTail:
    """Passes the guest's console output on to its console and keeps the last few KiB of it:
    a crash report shows what the guest printed last, wherever its console went (a file, a
    socket, a terminal scrolled away)."""

    def __init__(self, console: Console, keep: int = 4096) -> None:
        self._console = console
        self._keep = keep
        self._tail = bytearray()

    def write(self, data: bytes) -> None:
        self._console.write(data)
        tail = self._tail
        tail += data
        if len(tail) > 2 * self._keep:  # trimmed now and then, not at every byte
            del tail[: -self._keep]

    def lines(self, count: int) -> list[str]:
        """The last `count` lines the guest printed (a last line not yet ended included)."""
        text = bytes(self._tail[-self._keep :]).decode(errors="replace")
        return [line.rstrip("\r") for line in text.rstrip("\n").split("\n")[-count:] if line]


class StdioConsole(Console):
    def __init__(self, interactive: bool | None = None) -> None:
        self._out = sys.stdout.buffer
        self._reader_gone = False
        if interactive is None:
            interactive = sys.stdin.isatty()
        self._interactive = interactive

    def write(self, data: bytes) -> None:
        if self._reader_gone:
            return
        try:
            self._out.write(data)
            self._out.flush()
        except BrokenPipeError:
            # The reader went away (`pyvmm run ... | head`): the guest keeps running and its
            # output is dropped. stdout now points at /dev/null, so that the buffered rest is
            # not flushed into the broken pipe again at exit.
            self._reader_gone = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)

    def input_fd(self) -> int | None:
        return sys.stdin.fileno() if self._interactive else None


class FileConsole(Console):
    def __init__(self, path: str) -> None:
        try:
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        except OSError as err:
            raise ConfigError(f"cannot open console file {path}: {err.strerror}") from None

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def close(self) -> None:
        self._file.close()


class SocketConsole(Console):
    """Connects to a listening UNIX stream socket (e.g. `socat UNIX-LISTEN:PATH -`)."""

    def __init__(self, path: str) -> None:
        import socket  # (here: the socket module's import is a tenth of a test guest's start-up)

        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(path)
        except OSError as err:
            self._sock.close()
            raise ConfigError(
                f"cannot connect console socket {path}: {err.strerror}; start a listener first, "
                f"e.g. socat UNIX-LISTEN:{path} -"
            ) from None

    def write(self, data: bytes) -> None:
        # If the reader went away, the guest keeps running and its output is dropped.
        with contextlib.suppress(OSError):
            self._sock.sendall(data)

    def input_fd(self) -> int | None:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


class CaptureConsole(Console):
    """Keeps everything the guest printed; lets a test wait for a line. Optionally tees."""

    def __init__(self, tee: Callable[[bytes], None] | None = None) -> None:
        self._data = bytearray()
        self._cond = threading.Condition()
        self._tee = tee
        self.line_callbacks: list[Callable[[str], None]] = []
        self._partial = bytearray()

    def write(self, data: bytes) -> None:
        with self._cond:
            self._data += data
            self._partial += data
            lines = []
            while b"\n" in self._partial:
                line, _, rest = bytes(self._partial).partition(b"\n")
                self._partial = bytearray(rest)
                lines.append(line.decode(errors="replace").rstrip("\r"))
            self._cond.notify_all()
        for line in lines:
            for callback in self.line_callbacks:
                callback(line)
        if self._tee:
            self._tee(data)

    @property
    def text(self) -> str:
        with self._cond:
            return self._data.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Block until `pattern` (a regex) appears in the output; TimeoutError otherwise."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = regex.search(self._data.decode(errors="replace"))
                if match:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"guest did not print {pattern!r}; output so far:\n{self.text}"
                    )
                self._cond.wait(remaining)


class ConsoleInput:
    """Forwards a console's input bytes to the guest's UART (`receive`, which says how many
    it took) from a thread of its own, holding back what does not fit yet.

    Pausable: while paused nothing is handed to the UART, so a paused machine's state stays
    as it was; input waits in the console's fd meanwhile. What was read from the fd but not yet
    taken by the UART (at most one read of 64 bytes) stays here: it is the host console's,
    not part of the machine's saved state."""

    def __init__(self, fd: int, receive: Callable[[bytes], int]) -> None:
        self._fd = fd
        self._receive = receive
        self._lock = threading.Lock()
        self._paused = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread = start_thread(self._pump, "console-input")

    def _pump(self) -> None:
        pending = b""
        while True:
            waiting = bool(pending) or self._paused
            ready, _, _ = select.select(
                [self._wake_r] if self._paused else [self._fd, self._wake_r],
                [],
                [],
                0.05 if waiting else None,
            )
            if self._wake_r in ready:
                return
            if not pending and self._fd in ready:
                try:
                    pending = os.read(self._fd, 64)
                except OSError:  # EIO: a background job's terminal; the input is gone
                    return
                if not pending:
                    return
            with self._lock:
                if pending and not self._paused:
                    pending = pending[self._receive(pending) :]

    def pause(self) -> None:
        with self._lock:  # waits for a hand-over in progress
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)


def open_console(spec: str) -> Console:
    """Parse a --console value."""
    if spec == "stdio":
        return StdioConsole()
    kind, sep, path = spec.partition(":")
    if sep and path and kind == "file":
        return FileConsole(path)
    if sep and path and kind == "socket":
        return SocketConsole(path)
    raise ConfigError(f"bad --console {spec!r}: use stdio, file:PATH or socket:PATH")
