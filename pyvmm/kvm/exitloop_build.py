"""Builds pyvmm.kvm._exitloop from exitloop.c with cffi (API mode) and the system's C compiler.

setup.py names this builder (cffi_modules), so a wheel and an editable install both compile it;
a machine without a compiler gets one clear error at install. The module carries a checksum of
the source it was built from, so pyvmm.kvm.exitloop can refuse a stale build by name.
"""

from __future__ import annotations

import shutil
import sysconfig
import zlib
from pathlib import Path

from cffi import FFI

SOURCE = Path(__file__).with_name("exitloop.c")

CDEF = """
struct pyvmm_exit {
    uint32_t reason;
    uint32_t size;
    uint64_t where;
    uint64_t value;
    uint32_t count;
    uint32_t data_offset;
    uint32_t is_write;
    uint32_t pad;
};
int pyvmm_vcpu_run(int fd, void *page, struct pyvmm_exit *exit);
void pyvmm_complete_read(void *page, const struct pyvmm_exit *exit, uint64_t value);
void pyvmm_exitloop_offsets(uint32_t offsets[11]);
const char *pyvmm_exitloop_source_checksum(void);
"""


def source_checksum(*texts: str) -> str:
    """The checksum the module embeds, of exitloop.c and this file (its cdef): the same as
    exitloop.source_checksum (the build cannot import the package it is building; the
    exit-loop tests check a fresh build)."""
    crc = 0
    for text in texts:
        crc = zlib.crc32(text.encode(), crc)
    return f"{crc:08x}"


def _builder() -> FFI:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        raise SystemExit(
            f"pyvmm: building its C exit loop needs a C compiler ({compiler!r} is not on PATH) "
            "and the kernel's headers: install gcc and linux-libc-dev (Debian), then reinstall"
        )
    text = SOURCE.read_text()
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "pyvmm.kvm._exitloop",
        text
        + "\nconst char *pyvmm_exitloop_source_checksum(void) "
        + f'{{ return "{source_checksum(text, Path(__file__).read_text())}"; }}\n',
        extra_compile_args=["-O2", "-Wall"],
    )
    return ffi


ffibuilder = _builder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(Path(__file__).resolve().parents[2]), verbose=True)
