"""The connection a live migration runs on: its address, its sockets, and the JSON lines the
destination answers with.

The source sends the VM state stream (stream.py) and reads the destination's answers on the same
socket, one JSON object a line: {"accept": true, ...} once it has built its machine,
{"resumed": true, ...} once that runs, {"error": "why"} when it refuses (source.py,
destination.py and postcopy_link.py say what each side sends when).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.migration.sockets import json_line, listen_unix

REPLY_TIMEOUT = 60.0  # seconds the source waits for an answer (a destination building a VM)
SEND_TIMEOUT = 60.0  # seconds a send may block (a destination that stopped reading)
CONNECT_WAIT = 10.0  # seconds the source waits for a destination to listen
RECEIVE_BUFFER = 512 << 10  # a TCP destination's receive buffer (Endpoint.listen says why)


class MigrationError(PyvmmError):
    """A migration failed; the source machine runs on."""


class Refused(MigrationError):
    """The destination answered with an error: it does not run the machine."""


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

    def accept_source(self, on_listening: Callable[[], None] | None = None) -> socket.socket:
        """Listen here (then call `on_listening`) until a source connects, and return its
        connection; the listener (and a unix socket's file) is gone once this returns."""
        listener = self.listen()
        try:
            if on_listening is not None:
                on_listening()
            sock = _first_source(listener)
            self.no_delay(sock)
            return sock
        finally:
            listener.close()
            if self.family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    os.unlink(str(self.address))


def _first_source(listener: socket.socket) -> socket.socket:
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


@contextlib.contextmanager
def connection(endpoint: Endpoint) -> Iterator[socket.socket]:
    """The source's connection to the destination; shut down on the way out, so the
    destination sees the end at once (files made from the socket would otherwise keep it
    open)."""
    sock = endpoint.connect(SEND_TIMEOUT)
    try:
        yield sock
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def queued(sock: socket.socket) -> int:
    """Bytes sent on `sock` that the peer has not read yet (still in the socket's buffers)."""
    buffer = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buffer)
    return int.from_bytes(buffer, sys.byteorder)


def answer(sock: socket.socket, message: dict[str, Any]) -> None:
    """Send the destination's answer; a source that went away is noticed by what follows."""
    with contextlib.suppress(OSError):
        sock.sendall(json_line(message))


def expect(answers: BinaryIO, sock: socket.socket, key: str, doing: str) -> dict[str, Any]:
    """Wait for the destination's {key: true, ...} and return it; MigrationError with its
    error otherwise (Refused if it answered with one)."""
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
        reply = json.loads(line)
    except ValueError:
        raise MigrationError("the destination answered with something that is not JSON") from None
    if not isinstance(reply, dict) or reply.get(key) is not True:
        error = reply.get("error") if isinstance(reply, dict) else None
        raise Refused(f"the destination refused: {error or reply}")
    return reply
