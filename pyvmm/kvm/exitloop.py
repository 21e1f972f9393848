"""The C exit path (exitloop.c, built by cffi into pyvmm.kvm._exitloop), loaded and checked.

There is no ctypes fallback: a slower path that switches itself on would hide itself. A missing
or stale build is refused in one line that says how to build it.
"""

from __future__ import annotations

import os
import zlib

from pyvmm.kvm.errors import KvmError

_HERE = os.path.dirname(__file__)  # (os.path: pathlib is slower to import)
#: what the build was made from: the C source and its builder (the cdef)
_SOURCES = [os.path.join(_HERE, "exitloop.c"), os.path.join(_HERE, "exitloop_build.py")]
_REBUILD = "build it with scripts/setup (or pip install -e .), which needs gcc"

try:
    from pyvmm.kvm._exitloop import ffi, lib
except ImportError as err:
    raise KvmError(f"pyvmm's C exit loop is not built ({err}): {_REBUILD}") from None


def source_checksum(*texts: str) -> str:
    """What the build embeds of its sources (exitloop_build.source_checksum, the same): a CRC,
    which tells edits apart and guards nothing; hashlib's import costs more than the check."""
    crc = 0
    for text in texts:
        crc = zlib.crc32(text.encode(), crc)
    return f"{crc:08x}"


def _check_build() -> None:
    """Refuse a build older than the sources beside it (an edited checkout not rebuilt);
    where they are not beside it, there is nothing to compare."""
    try:
        texts = []
        for path in _SOURCES:
            with open(path) as source:
                texts.append(source.read())
    except OSError:
        return
    built = ffi.string(lib.pyvmm_exitloop_source_checksum()).decode()
    if built != source_checksum(*texts):
        raise KvmError(f"pyvmm's C exit loop was built from older sources: {_REBUILD}")


_check_build()

__all__ = ["ffi", "lib"]
