"""`pyvmm restore`: run a machine from a snapshot directory.

pyvmm restore DIR [--copy | --mmap] [--console SPEC] [--vfio-host OLD=NEW ...] [--control PATH]
              [--timeout S]
"""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from pyvmm.commands.options import add_host_moves
    from pyvmm.commands.run import add_run_options

    command = subparsers.add_parser(
        "restore",
        help="run a machine from a snapshot",
        description="Build the snapshot's machine, give it the snapshot's state and run it on. "
        "Its RAM maps the snapshot's memory file privately (nothing is read until the guest "
        "touches it; the file is never written), or is read into fresh RAM: by default only "
        "for a machine with a passed-through device, whose DMA mapping would read it all "
        "anyway. Exit codes as pyvmm run's.",
    )
    command.add_argument("directory", metavar="DIR", help="a directory written by pyvmm snapshot")
    mode = command.add_mutually_exclusive_group()
    mode.add_argument(
        "--copy",
        action="store_const",
        const=True,
        dest="copy",
        help="read the memory file into new RAM, not map it",
    )
    mode.add_argument(
        "--mmap",
        action="store_const",
        const=False,
        dest="copy",
        help="map the memory file, even for a machine with a passed-through device",
    )
    command.add_argument(
        "--console",
        default=None,
        help="where COM1 goes: stdio, file:PATH or socket:PATH (default: where the snapshotted "
        "machine had it)",
    )
    add_host_moves(command)
    add_run_options(command)
    command.set_defaults(func=cmd_restore)


def cmd_restore(args: argparse.Namespace) -> int:
    from pyvmm.commands.run import inherited_console, run_until_done
    from pyvmm.machine.console import open_console
    from pyvmm.migration import snapshot

    saved = snapshot.read(args.directory)
    args.console = inherited_console(args.console, saved.info)
    console = open_console(args.console)
    with snapshot.restore(
        saved, console, copy=args.copy, trace_exits=args.exit_stats, hosts=dict(args.vfio_host)
    ) as machine:
        return run_until_done(machine, args)
