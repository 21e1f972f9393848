"""The unix sockets pyvmm listens on (a control socket, a migration's --incoming): private to
the user (0600), and a stale socket file left by a pyvmm that ended without removing it is
replaced, but never a live one or a file that is not a socket."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

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
        except OSError:
            target.unlink()  # stale: no one listens
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
