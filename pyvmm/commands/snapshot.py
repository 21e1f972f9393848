"""`pyvmm snapshot`: snapshot a running pyvmm through its control socket.

pyvmm snapshot CONTROL DIR [--incremental] [--stop] [--allow-device-reset]
"""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "snapshot",
        help="snapshot a running machine to a directory",
        description="Pause the machine served at CONTROL (pyvmm run --control CONTROL), write "
        "its state and RAM to DIR, a new directory, and resume it (or end it with --stop). "
        "Restore it with pyvmm restore DIR.",
    )
    command.add_argument("control", metavar="CONTROL", help="the machine's control socket")
    command.add_argument("directory", metavar="DIR", help="the snapshot's directory (new)")
    command.add_argument(
        "--incremental",
        action="store_true",
        help="write only the pages written since this machine's previous snapshot, which the "
        "new one builds on (restore needs both)",
    )
    command.add_argument("--stop", action="store_true", help="end the machine once written")
    command.add_argument(
        "--allow-device-reset",
        action="store_true",
        help="snapshot a machine with passed-through devices whose drivers have no VFIO "
        "migration, although their own state cannot be saved: restored, each is as reset, "
        "with the config space, BARs and interrupts its guest set up (devices that migrate "
        "are saved whole without it)",
    )
    command.set_defaults(func=cmd_snapshot)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pyvmm.control.client import ControlClient

    directory = str(Path(args.directory).absolute())  # the server's working directory may differ
    with ControlClient(args.control) as client:
        result = client.execute(
            "snapshot",
            path=directory,
            stop=args.stop,
            incremental=args.incremental,
            allow_device_reset=args.allow_device_reset,
        )
    print(
        f"pyvmm: snapshot {args.directory}: {result['ram_bytes'] >> 20} MiB of RAM, "
        f"{result['written_bytes'] >> 10} KiB of it written, in "
        f"{result['seconds'] * 1000:.1f} ms"
    )
    return 0
