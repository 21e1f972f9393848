"""`pyvmm guest build FILE.c [-o FILE.elf]`: a user's freestanding test guest, built against the
firmware runtime pyvmm carries (`#include <pyvmmfw.h>`: serial printf, interrupts, PCI, virtio,
the debug exit) with the system gcc; the runtime is built once, into pyvmm's cache."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.guest_files import firmware_dir
from pyvmm.lab.kernel import cache_dir


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    guest = subparsers.add_parser("guest", help="test guests: build one from C")
    commands = guest.add_subparsers(dest="guest_command", metavar="COMMAND", required=True)
    build = commands.add_parser(
        "build",
        help="build a freestanding C file into an ELF test guest",
        description="Compile FILE.c against pyvmm's firmware runtime (include <pyvmmfw.h>; its "
        "main() returns the guest's exit code) and link an ELF64 test guest for `pyvmm run`.",
    )
    build.add_argument("source", metavar="FILE.c", help="the guest's one C file")
    build.add_argument(
        "-o", "--output", metavar="FILE.elf", help="the image (default: FILE.elf beside FILE.c)"
    )
    build.set_defaults(func=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    source = os.path.abspath(args.source)
    if not os.path.isfile(source):
        raise ConfigError(f"{args.source}: no such file")
    output = os.path.abspath(args.output or os.path.splitext(source)[0] + ".elf")
    build_guest(source, output)
    print(output)
    return 0


def build_guest(source: str, output: str) -> None:
    """Compile and link `source` into `output`; the compiler's messages go to stderr, and a
    failure is a PyvmmError saying so."""
    for tool in ("make", "gcc"):
        if shutil.which(tool) is None:
            raise PyvmmError(
                f"building a guest needs {tool}, which is not on PATH: install it "
                "(Debian: apt install build-essential)"
            )
    firmware = firmware_dir()
    # the runtime's objects, per runtime source tree (a checkout and a wheel apart)
    tree = hashlib.sha256(firmware.encode()).hexdigest()[:12]
    runtime = cache_dir() / "firmware" / tree
    with tempfile.TemporaryDirectory(prefix="pyvmm-guest-") as objects:
        done = subprocess.run(
            [
                "make",
                "-s",
                "-f",
                os.path.join(firmware, "guest.mk"),
                f"SRC={source}",
                f"OUT={output}",
                f"OBJ_DIR={objects}",
                f"FW_BUILD={runtime}",
            ],
            stdout=sys.stderr,
            check=False,
        )
    if done.returncode != 0:
        raise PyvmmError(
            f"{os.path.basename(source)} did not build (the compiler's messages are above)"
        )
