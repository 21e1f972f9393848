"""`pyvmm ctl`: send one command to a running pyvmm's control socket and print the reply.

pyvmm ctl CONTROL COMMAND [NAME=VALUE ...]      e.g. pyvmm ctl /tmp/vm.sock status
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "ctl",
        help="send a command to a running machine",
        description="Send COMMAND with its arguments (NAME=VALUE, VALUE read as JSON when it "
        "is JSON, else as a string) to the control socket of a pyvmm run --control CONTROL; "
        "print the result as JSON. Commands: status, pause, resume, snapshot path=DIR "
        "[stop=true] [incremental=true], migrate uri=URI [downtime_ms=N] [max_rounds=N], "
        "migrate-status, quit; with iommufd: iommufd-objects, hwpt-alloc device=BDF "
        "[nest_parent=true] [dirty_tracking=true], hwpt-attach device=BDF id=N, "
        "iommufd-destroy id=N (docs/control.md).",
    )
    command.add_argument("control", metavar="CONTROL", help="the machine's control socket")
    command.add_argument("name", metavar="COMMAND")
    command.add_argument("arguments", metavar="NAME=VALUE", nargs="*")
    command.set_defaults(func=cmd_ctl)


def parse_arguments(items: list[str]) -> dict[str, Any]:
    from pyvmm.errors import ConfigError

    arguments: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"bad argument {item!r}: give NAME=VALUE")
        try:
            arguments[name] = json.loads(text)
        except ValueError:
            arguments[name] = text
    return arguments


def cmd_ctl(args: argparse.Namespace) -> int:
    from pyvmm.control.client import ControlClient

    with ControlClient(args.control) as client:
        result = client.execute(args.name, **parse_arguments(args.arguments))
    print(json.dumps(result))
    return 0
