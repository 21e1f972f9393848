"""The C exit path (exitloop.c, built by cffi into pyvmm.kvm._exitloop), loaded and checked.

There is no ctypes fallback: a slower path that switches itself on would hide itself. A missing
or stale build is refused in one line that says how to build it.
"""

from __future__ import annotations

import os
import zlib

from pyvmm.kvm.errors import KvmError

_SOURCE = os.path.join(os.path.dirname(__file__), "exitloop.c")  # (pathlib: slower to import)
_REBUILD = "build it with scripts/setup (or pip install -e .), which needs gcc"

try:
    from pyvmm.kvm._exitloop import ffi, lib
except ImportError as err:
    raise KvmError(f"pyvmm's C exit loop is not built ({err}): {_REBUILD}") from None


def source_checksum(text: str) -> str:
    """What the build embeds of its source (exitloop_build.source_checksum, the same): a CRC,
    which tells edits apart and guards nothing; hashlib's import costs more than the check."""
    return f"{zlib.crc32(text.encode()):08x}"


def _check_build() -> None:
    """Refuse a build older than the source beside it (an edited checkout not rebuilt). An
    installed wheel without the source has nothing to compare and is taken as built."""
    try:
        with open(_SOURCE) as source:
            text = source.read()
    except OSError:
        return
    built = ffi.string(lib.pyvmm_exitloop_source_checksum()).decode()
    if built != source_checksum(text):
        name = os.path.basename(_SOURCE)
        raise KvmError(f"pyvmm's C exit loop was built from an older {name}: {_REBUILD}")


_check_build()

__all__ = ["ffi", "lib"]
