"""A client of the control socket (server.py has the protocol): what `pyvmm ctl`, `pyvmm
migrate` and scripts use. It imports nothing of the machine, so a command that only talks to a
running pyvmm starts quickly."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any

from pyvmm.errors import PyvmmError
from pyvmm.migration.sockets import json_line

MAX_REQUEST = 1 << 20  # bytes in one line: a request, a reply or an event


class ControlError(PyvmmError):
    """A control request failed, or the control socket cannot be used."""


class ControlClient:
    """A connection to a control socket: `execute()` returns a command's result, or raises
    ControlError with the server's error; `events` collects the events seen meanwhile."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as err:
            self._sock.close()
            raise ControlError(
                f"cannot connect to the control socket {path}: {err.strerror}; is a pyvmm "
                "running with --control there?"
            ) from None
        self._file = self._sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self._next_id = 1
        self.greeting = self._read()
        if "pyvmm" not in self.greeting:
            self.close()
            raise ControlError(f"{path} is not a pyvmm control socket")

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline(MAX_REQUEST)
        except OSError as err:
            raise ControlError(f"the control socket failed: {err}") from None
        if not line:
            raise ControlError("the control socket closed (the machine ended?)")
        try:
            message = json.loads(line)
        except ValueError:
            raise ControlError("the control socket sent something that is not JSON") from None
        if not isinstance(message, dict):
            raise ControlError("the control socket sent something that is not an object")
        return message

    def execute(self, command: str, **arguments: Any) -> dict[str, Any]:
        request_id = self._next_id
        self._next_id += 1
        request = {"execute": command, "arguments": arguments, "id": request_id}
        try:
            self._sock.sendall(json_line(request))
        except OSError as err:
            self._drain()
            raise ControlError(f"the control socket failed: {err.strerror}") from None
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
                continue
            if message.get("id") != request_id:
                continue
            if "error" in message:
                raise ControlError(str(message["error"].get("desc", message["error"])))
            return message.get("return", {})

    def _drain(self) -> None:
        """Keep the events the server sent before it went away."""
        with contextlib.suppress(ControlError):
            while True:
                message = self._read()
                if "event" in message:
                    self.events.append(message)

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def follow_migration(
    client: ControlClient, on_status: Callable[[dict[str, Any]], None], poll: float = 0.25
) -> dict[str, Any]:
    """Poll `migrate-status` (each status to `on_status`) until the migration has completed
    or failed; that final status. A migrated machine ends, and its control socket with it:
    its outcome came just before, as the MIGRATION event. Each status costs the source's
    control thread CPU that its guest and the migration share: in the lab (one CPU, TCG),
    polling every 50 ms took a tenth of it."""
    while True:
        try:
            status = client.execute("migrate-status")
        except ControlError:
            ends = [e["data"] for e in client.events if e.get("event") == "MIGRATION"]
            if not ends:
                raise
            status = ends[-1]
        on_status(status)
        if status["status"] in ("completed", "failed"):
            return status
        time.sleep(poll)
