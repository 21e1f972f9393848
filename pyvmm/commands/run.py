"""`pyvmm run`: boot a guest image and exit with the guest's exit code."""

from __future__ import annotations

import argparse
import sys

from pyvmm.machine.console import open_console
from pyvmm.machine.machine import Machine, StopReason


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from pyvmm.cli import parse_size

    run = subparsers.add_parser(
        "run",
        help="boot a guest",
        description="Boot an ELF64 test guest. Exits with the code the guest writes to the "
        "debug-exit port (0x501), 0 on guest reset or poweroff, 1 on error.",
    )
    run.add_argument("image", metavar="GUEST.elf", help="ELF64 x86-64 executable to boot")
    run.add_argument("-m", "--mem", type=parse_size, default=64 << 20, help="RAM (default 64M)")
    run.add_argument("-c", "--cpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument(
        "--console",
        default="stdio",
        help="where COM1 goes: stdio (default), file:PATH or socket:PATH",
    )
    run.add_argument("--timeout", type=float, default=None, help="stop the guest after S seconds")
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    console = open_console(args.console)
    with Machine(mem_size=args.mem, vcpus=args.cpus, console=console) as machine:
        machine.load_elf(args.image)
        result = machine.run(timeout=args.timeout)
    if result.reason in (StopReason.ERROR, StopReason.TRIPLE_FAULT, StopReason.STOPPED):
        print(f"pyvmm: {result.reason.value}: {result.detail}", file=sys.stderr)
    return result.exit_code
