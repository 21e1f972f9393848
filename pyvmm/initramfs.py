"""Initramfs images: a writer for the kernel's "newc" cpio format, and busybox test images.

A few entries do not justify depending on a cpio tool. `busybox_initramfs` makes the smallest
useful Linux userspace: a static busybox and an init script, which is what pyvmm's Linux boot
tests and benchmarks boot (and what `pyvmm lab` boots, with its own init).
"""

from __future__ import annotations

import stat
from pathlib import Path

#: The start of a busybox init script: the applets on PATH, /proc, /sys and /dev mounted.
BUSYBOX_INIT_PRELUDE = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
"""


class CpioWriter:
    """Writes a newc ("070701") cpio archive, the format the kernel unpacks as an initramfs."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._ino = 0

    def _entry(
        self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,
            0,  # mtime
            len(body),
            0,  # dev major
            0,  # dev minor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        self._data += b"070701" + b"".join(b"%08X" % field for field in fields)
        self._data += encoded
        self._pad()
        self._data += body
        self._pad()

    def _pad(self) -> None:
        self._data += b"\0" * (-len(self._data) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, body)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self._data)


def busybox_initramfs(busybox: Path, init: str) -> bytes:
    """An initramfs holding a static busybox and `init` (a busybox sh script) as /init."""
    cpio = CpioWriter()
    for directory in ("bin", "dev", "proc", "sys", "tmp", "mnt", "root"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init.encode(), 0o755)
    return cpio.finish()
