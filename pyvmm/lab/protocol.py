"""The byte protocol between the lab's guest agent and the host launcher.

The agent sends everything on one virtio-serial port as frames: a kind byte, a 4-byte length and
the payload. One port keeps the order: when the host reads the EXIT frame, every byte the command
wrote before it has already arrived, which two separate ports (one per stream) could not promise.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterator
from typing import Any

_HEADER = struct.Struct("<BI")

#: The largest payload one frame carries; longer output is split.
MAX_PAYLOAD = 1 << 16


class Kind(enum.IntEnum):
    HELLO = 1  # json: the agent is up; {"uptime": seconds since the guest kernel started}
    STDOUT = 2  # raw bytes of the command's standard output
    STDERR = 3  # raw bytes of the command's standard error
    EXIT = 4  # json: {"code": exit status}; the last frame
    ERROR = 5  # utf-8: the lab could not run the command, one line; the last frame


def encode(kind: Kind, payload: bytes) -> bytes:
    """One frame (payload at most MAX_PAYLOAD bytes)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return _HEADER.pack(kind, len(payload)) + payload


def encode_json(kind: Kind, value: Any) -> bytes:
    return encode(kind, json.dumps(value).encode())


class FrameReader:
    """Reassembles frames from the byte chunks a stream delivers."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[Kind, bytes]]:
        """Add bytes and yield every frame that is now complete."""
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            yield Kind(kind), payload

    @property
    def pending(self) -> int:
        """Bytes held back as an incomplete frame."""
        return len(self._buffer)
