"""The control socket: a running machine driven over a unix socket in JSON lines, QMP-like.

On connecting, a client receives a greeting, then sends requests, one JSON object per line, and
gets one reply per request, in order; events may come between replies (docs/control.md):

    <- {"pyvmm": {"version": "0.1.0", "commands": ["pause", "quit", ...]}}
    -> {"execute": "snapshot", "arguments": {"path": "/tmp/snap"}, "id": 1}
    <- {"event": "STOP", "data": {"reason": "paused"}, "timestamp": 1764600000.123}
    <- {"event": "RESUME", "data": {}, "timestamp": 1764600000.131}
    <- {"return": {"seconds": 0.008, "ram_bytes": 67108864, "written_bytes": 393216}, "id": 1}

An error reply is `{"error": {"class": "...", "desc": "one line"}, "id": ...}`; a request that is
not valid JSON, or not an object naming a known command with the arguments it takes, gets one
and the connection stays usable. The server runs on a thread of its own (one request at a time,
any number of clients); a command that takes long (a snapshot) holds the others' replies, not
the guest, which runs on while nothing pauses it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pyvmm import __version__
from pyvmm.board.machine import Machine, RunState, StopReason
from pyvmm.control.client import MAX_REQUEST, ControlError
from pyvmm.errors import PyvmmError
from pyvmm.machine.threads import start_thread
from pyvmm.migration import snapshot
from pyvmm.migration.sockets import json_line, listen_unix
from pyvmm.migration.source import Migration
from pyvmm.migration.transport import Endpoint
from pyvmm.vfio import control as vfio_control

log = logging.getLogger(__name__)

SEND_TIMEOUT = 5.0  # seconds a reply or event may wait for a client to read


class ControlServer:
    """Serves `machine` on a unix socket at `path` until `close()`; `console` is the --console
    spec the machine's console was opened with (recorded in snapshots)."""

    def __init__(
        self,
        machine: Machine,
        path: str,
        console: str = "stdio",
        *,
        listener: socket.socket | None = None,
    ) -> None:
        self.machine = machine
        self.path = path
        self.console = console
        self.commands: dict[str, Callable[..., dict[str, Any]]] = {
            "status": self.status,
            "pause": self.pause,
            "resume": self.resume,
            "snapshot": self.snapshot,
            "migrate": self.migrate,
            "migrate-status": self.migrate_status,
            "quit": self.quit,
            "viommu-domains": self.viommu_domains,
            **vfio_control.commands(machine),
        }
        self._migration: Migration | None = None
        self._last_snapshot: str | None = None  # what an incremental snapshot builds on
        # (a listener made earlier: a migration's destination checks --control before it
        # takes the machine in, since the source cannot have it back once it has gone across)
        self._listener = listener or listen_control(path)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._clients: dict[socket.socket, bytearray] = {}
        self._lock = threading.Lock()  # the clients, for events sent from other threads
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closing = False
        self._thread = start_thread(self._serve, "control")

    # commands: each returns the reply's "return" object

    def status(self) -> dict[str, Any]:
        config = self.machine.config
        return {
            "status": self.machine.state.value,
            "vcpus": config.vcpus,
            "mem_size": config.mem_size,
            "devices": [device.kind for device in config.devices],
        }

    def _not_migrating(self) -> None:
        """A migration owns the machine's pauses and its dirty log until it ends."""
        if self._migration is not None and not self._migration.done.is_set():
            raise ControlError("a migration is under way: wait for it (migrate-status)")

    def pause(self) -> dict[str, Any]:
        self._not_migrating()
        if not self.machine.pause():
            raise ControlError("the machine has stopped")
        self.event("STOP", reason="paused")
        return {}

    def resume(self) -> dict[str, Any]:
        self._not_migrating()
        if self.machine.state is RunState.STOPPED:
            raise ControlError("the machine has stopped")
        self.machine.resume()
        self.event("RESUME")
        return {}

    def snapshot(
        self,
        path: str,
        stop: bool = False,
        incremental: bool = False,
        allow_device_reset: bool = False,
    ) -> dict[str, Any]:
        """Pause (if running), write a snapshot to `path`, then resume, or stop with `stop`. A
        failed snapshot resumes the machine all the same. Every snapshot starts (or goes on
        with) the dirty log, so that an `incremental` one can follow: it holds only the pages
        written since the previous snapshot, which it builds on. A machine with a passed-
        through device is snapshotted only with `allow_device_reset` (snapshot.write)."""
        self._not_migrating()
        snapshot.check_savable(  # before the pause: a refusal leaves the machine alone
            self.machine, allow_device_reset=allow_device_reset, incremental=incremental
        )
        dirty = self.machine.dirty
        if incremental and (self._last_snapshot is None or not dirty.active):
            raise ControlError("no earlier snapshot of this machine to build on: take a full one")
        was_running = self.machine.state is RunState.RUNNING
        if not self.machine.pause():
            raise ControlError("the machine has stopped")
        self.event("STOP", reason="snapshot")
        written = False
        try:
            stats = self._write_snapshot(path, incremental, allow_device_reset)
            written = True
        finally:
            if was_running and not (stop and written):
                self.machine.resume()
                self.event("RESUME")
        if stop:
            self.machine.stop(StopReason.STOPPED, 0, f"snapshotted to {path}")
        return {
            "seconds": round(stats.seconds, 6),
            "ram_bytes": stats.ram_bytes,
            "written_bytes": stats.written_bytes,
        }

    def _write_snapshot(
        self, path: str, incremental: bool, allow_device_reset: bool
    ) -> snapshot.SnapshotStats:
        dirty = self.machine.dirty
        info = {"console": self.console, "time": time.time()}
        since = dirty.collect() if dirty.active else None
        if since is None and not self.machine.components.caveats():
            dirty.start()  # for an incremental one next (never of a machine with caveats)
        try:
            if incremental:
                parent = self._last_snapshot
                stats = snapshot.write(
                    self.machine,
                    path,
                    info,
                    parent=parent,
                    dirty=since,
                    allow_device_reset=allow_device_reset,
                )
            else:
                stats = snapshot.write(
                    self.machine, path, info, allow_device_reset=allow_device_reset
                )
        except BaseException:
            if since is not None:
                dirty.remark(since)  # the next incremental one must still have those pages
            raise
        self._last_snapshot = path
        return stats

    def migrate(
        self,
        uri: str,
        downtime_ms: int = 30,
        max_rounds: int = 30,
        auto_converge: bool = False,
        postcopy: bool = False,
    ) -> dict[str, Any]:
        """Start migrating to `uri` (a pyvmm run --incoming URI); follow it with
        migrate-status or the MIGRATION event. The machine stops once the destination runs
        (with `postcopy`, once the destination has all of its RAM)."""
        self._not_migrating()
        if self.machine.state is RunState.STOPPED:
            raise ControlError("the machine has stopped")
        if not (0 < downtime_ms <= 3_600_000 and 0 < max_rounds <= 10_000):
            raise ControlError("downtime_ms is 1 to 3600000 and max_rounds 1 to 10000")
        endpoint = Endpoint.parse(uri)
        self._last_snapshot = None  # the migration takes over the dirty log
        self._migration = Migration(
            self.machine,
            endpoint,
            info={"console": self.console, "time": time.time()},
            downtime_limit=downtime_ms / 1000,
            max_rounds=max_rounds,
            auto_converge=auto_converge,
            postcopy=postcopy,
            on_end=lambda progress: self.event("MIGRATION", **progress.as_dict()),
        )
        self._migration.start()
        return {}

    @property
    def migrated_away(self) -> bool:
        """Whether a migration has handed the machine over: it runs at the destination."""
        return self._migration is not None and self._migration.progress.status == "completed"

    def migrate_status(self) -> dict[str, Any]:
        if self._migration is None:
            return {"status": "none"}
        return self._migration.progress.as_dict()

    def viommu_domains(self) -> dict[str, Any]:
        domains = self.machine.viommu_domains
        if domains is None:
            raise ControlError("the machine has no virtio-iommu (--viommu virtio)")
        return domains

    def quit(self) -> dict[str, Any]:
        self.machine.stop(StopReason.STOPPED, 0, "quit from the control socket")
        return {}

    # events

    def event(self, name: str, **data: Any) -> None:
        """Send an event to every client (from any thread)."""
        line = json_line({"event": name, "data": data, "timestamp": round(time.time(), 6)})
        with self._lock:
            for client in list(self._clients):
                self._send(client, line)

    # serving

    def _serve(self) -> None:
        while not self._closing:
            for key, _ in self._selector.select():
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    return
                else:
                    self._receive(key.fileobj)  # type: ignore[arg-type]

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            client, _ = self._listener.accept()
            client.settimeout(SEND_TIMEOUT)  # a client that stops reading is dropped, not waited on
            with self._lock:
                self._clients[client] = bytearray()
                self._send(
                    client,
                    json_line(
                        {"pyvmm": {"version": __version__, "commands": sorted(self.commands)}}
                    ),
                )
            self._selector.register(client, selectors.EVENT_READ)

    def _receive(self, client: socket.socket) -> None:
        try:
            data = client.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        pending = self._clients.get(client)
        if pending is None:
            return
        pending += data
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            if end - start > MAX_REQUEST:
                break
            reply = self._handle(bytes(pending[start:end]))
            start = end + 1
            with self._lock:
                self._send(client, json_line(reply))
        del pending[:start]
        if len(pending) > MAX_REQUEST:
            with self._lock:
                self._send(client, json_line(_error("GenericError", "request line too long")))
            self._drop(client)

    def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            return _error("GenericError", "the request is not valid JSON")
        if not isinstance(request, dict):
            return _error("GenericError", 'a request is an object: {"execute": NAME, ...}')
        reply_id = {"id": request["id"]} if "id" in request else {}
        name = request.get("execute")
        arguments = request.get("arguments", {})
        command = self.commands.get(name) if isinstance(name, str) else None
        if command is None:
            known = ", ".join(sorted(self.commands))
            return _error("CommandNotFound", f"unknown command {name!r}; known: {known}") | reply_id
        if not isinstance(arguments, dict):
            return _error("GenericError", "arguments are an object") | reply_id
        problem = _check_arguments(command, arguments)
        if problem:
            return _error("GenericError", f"{name}: {problem}") | reply_id
        try:
            return {"return": command(**arguments)} | reply_id
        except PyvmmError as err:
            return _error("GenericError", str(err)) | reply_id
        except (RuntimeError, ValueError, OSError) as err:  # a machine in the wrong state,
            return _error("GenericError", str(err)) | reply_id  # a path the OS refuses, ...
        except Exception as err:  # a bug: the server must keep serving, and say so
            log.exception("control command %s failed", name)
            return _error("InternalError", f"{name} failed: {type(err).__name__}: {err}") | reply_id

    def _send(self, client: socket.socket, line: bytes) -> None:
        """Send to one client; one that cannot take it (gone, or not reading) is forgotten,
        and shut down so that the serving thread sees it end and closes it."""
        try:
            client.sendall(line)
        except OSError:
            self._clients.pop(client, None)
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)

    def _drop(self, client: socket.socket) -> None:
        with self._lock:
            self._clients.pop(client, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client)
        client.close()

    def close(self) -> None:
        """Stop serving; a migration still running is cancelled first (it reads the RAM that
        goes with the machine)."""
        if self._migration is not None:
            self._migration.cancel()
        self._closing = True
        os.write(self._wake_w, b"x")
        self._thread.join()
        for client in list(self._clients):
            self._drop(client)
        self._selector.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def listen_control(path: str) -> socket.socket:
    """The listening socket of a control server at `path` (ConfigError if it cannot be)."""
    return listen_unix(path, f"--control {path}")


def _check_arguments(command: Callable[..., Any], arguments: dict[str, Any]) -> str:
    """What is wrong with the arguments for `command` (names and JSON types), or ""."""
    parameters = inspect.signature(command).parameters
    unknown = sorted(set(arguments) - set(parameters))
    if unknown:
        return f"unknown argument {', '.join(unknown)}"
    for name, parameter in parameters.items():
        if name not in arguments:
            if parameter.default is inspect.Parameter.empty:
                return f"argument {name} is required"
            continue
        wanted = {"str": str, "bool": bool, "int": int, "float": float}.get(parameter.annotation)
        value = arguments[name]
        if wanted is not None and (type(value) is not wanted):
            return f"argument {name} must be a {parameter.annotation}"
    return ""


def _error(kind: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": kind, "desc": desc}}
