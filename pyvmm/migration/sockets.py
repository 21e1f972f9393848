"""The unix sockets pyvmm listens on (a control socket, a migration's --incoming): private to
the user (0600), and a stale socket file left by a pyvmm that ended without removing it is
replaced, but never a live one, another user's, or a file that is not a socket. And the JSON
lines that both the control socket and a migration's destination send.

Whether a socket file is live is asked by connecting to it (refused: stale), so a listener must
expect connections that close without a word: the control server drops them, and a migration's
destination goes on waiting (Endpoint.accept_source)."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

from pyvmm.errors import ConfigError


def listen_unix(path: str, what: str, backlog: int = 8) -> socket.socket:
    """A socket listening at `path`; ConfigError naming `what` (the option that gave the path)
    if it cannot be. Its mode is set before it listens, so no one else ever connects."""
    target = Path(path)
    if target.exists() or target.is_symlink():
        if not stat.S_ISSOCK(target.lstat().st_mode):
            raise ConfigError(f"{what}: a file that is not a socket is there")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM):
                raise ConfigError(f"{what}: another user's socket is there") from None
            if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ConfigError(
                    f"{what}: cannot tell whether {path} is in use: {err.strerror}"
                ) from None
            try:
                target.unlink(missing_ok=True)  # stale: no one listens
            except OSError as unlink_err:
                raise ConfigError(
                    f"{what}: a stale socket is there and cannot be removed: {unlink_err.strerror}"
                ) from None
        else:
            raise ConfigError(f"{what}: another process is listening there")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(backlog)
    except OSError as err:
        listener.close()
        raise ConfigError(f"{what}: cannot listen there: {err.strerror}") from None
    return listener


def json_line(message: dict[str, Any]) -> bytes:
    """`message` as one line of JSON, as both the control socket and a migration's destination
    send them."""
    return json.dumps(message).encode() + b"\n"
