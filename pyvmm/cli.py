"""The `pyvmm` command.

    pyvmm run GUEST.elf [-m 64M] [-c N] [--console stdio|file:PATH|socket:PATH] [--control P]
    pyvmm snapshot CONTROL DIR [--incremental] [--stop]   |   pyvmm restore DIR [--copy]
    pyvmm ctl CONTROL COMMAND [NAME=VALUE ...]
    pyvmm run --incoming unix:P|tcp:H:PORT   |   pyvmm migrate CONTROL unix:P|tcp:H:PORT
    pyvmm kvm info   |   pyvmm guest build FILE.c [-o FILE.elf]
    pyvmm vfio list | bind BDF | unbind BDF | mdev ...
    pyvmm iommufd info BDF | objects CONTROL
    pyvmm lab run [--iommu intel|virtio] [--device edu ...] -- CMD ...   |   pyvmm lab shell
    pyvmm --version

Each command group lives in its own module and adds its subcommands through
`add_commands(subparsers)`; a subcommand's `func(args)` returns the process exit code.
User errors (`PyvmmError`, a failing ioctl) print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pyvmm import __version__
from pyvmm.errors import PyvmmError
from pyvmm.kvm.errors import KvmError
from pyvmm.uapi.ioctl import IoctlError

# Each command group and the module that adds it with add_commands(subparsers).
COMMAND_MODULES = {
    "run": "pyvmm.commands.run",
    "snapshot": "pyvmm.commands.snapshot",
    "restore": "pyvmm.commands.restore",
    "ctl": "pyvmm.commands.ctl",
    "migrate": "pyvmm.commands.migrate",
    "kvm": "pyvmm.commands.kvm",
    "guest": "pyvmm.commands.guest",
    "vfio": "pyvmm.vfio.cli",
    "iommufd": "pyvmm.commands.iommufd",
    "lab": "pyvmm.lab.cli",
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for `argv`: with only the named command group's module imported when argv
    names one (start-up time counts: `pyvmm run` in the lab pays ~20x for every import), with
    all of them for help and errors."""
    parser = argparse.ArgumentParser(
        prog="pyvmm", description="A minimal virtual machine monitor on KVM, VFIO and iommufd."
    )
    parser.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    # The first word that is not an option; help before it wants every command listed.
    command = next((a for a in argv if not a.startswith("-") or a in ("-h", "--help")), None)
    for name, module in COMMAND_MODULES.items():
        if command not in COMMAND_MODULES or command == name:
            importlib.import_module(module).add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(argv)  # (imports the command's modules: a missing build says so)
        args = parser.parse_args(argv)
        level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
        logging.basicConfig(level=level, format="pyvmm: %(name)s: %(message)s")
        if not hasattr(args, "func"):
            parser.print_help(sys.stderr)
            return 2
        return args.func(args)
    except (PyvmmError, KvmError, IoctlError) as err:
        print(f"pyvmm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
