"""`pyvmm migrate`: live-migrate a running pyvmm to another, through its control socket.

pyvmm migrate CONTROL unix:PATH|tcp:HOST:PORT [--downtime MS] [--max-rounds N] [--auto-converge]
              [--postcopy]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "migrate",
        help="live-migrate a running machine to another pyvmm",
        description="Migrate the machine served at CONTROL (pyvmm run --control CONTROL) to a "
        "pyvmm run --incoming URI: its RAM is copied while it runs, round after round, until "
        "what is left fits the downtime limit; then it pauses, the rest and its state go "
        "across, and it ends once the destination runs it. A migration that fails leaves it "
        "running. Shows progress; exits 0 once migrated.",
    )
    command.add_argument("control", metavar="CONTROL", help="the machine's control socket")
    command.add_argument("uri", metavar="URI", help="unix:PATH or tcp:HOST:PORT")
    command.add_argument(
        "--downtime", type=int, default=30, metavar="MS", help="downtime limit (default 30 ms)"
    )
    command.add_argument(
        "--max-rounds",
        type=int,
        default=30,
        metavar="N",
        help="give up after N rounds of copying that leave too much (default 30)",
    )
    command.add_argument(
        "--auto-converge",
        action="store_true",
        help="throttle a guest that dirties memory faster than it can be sent (20%% of its "
        "time, then 10 points more each round that stays too hot, up to 99%%)",
    )
    command.add_argument(
        "--postcopy",
        action="store_true",
        help="once rounds of copying stop paying, run the machine on the destination and send "
        "the rest as it asks for it (userfaultfd): a guest that never converges migrates with "
        "a short downtime, but until every page is across, losing either side loses the machine",
    )
    command.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from pyvmm.control.client import ControlClient, ControlError, follow_migration

    with ControlClient(args.control) as client:
        client.execute(
            "migrate",
            uri=args.uri,
            downtime_ms=args.downtime,
            max_rounds=args.max_rounds,
            auto_converge=args.auto_converge,
            postcopy=args.postcopy,
        )
        with ProgressBar() as bar:
            status = follow_migration(client, bar.update)
    if status["status"] == "failed":
        raise ControlError(f"migration failed: {status['error']}")
    print(
        f"pyvmm: migrated to {args.uri} in {status['seconds']:.2f} s, "
        f"{status['round']} rounds, {status['sent_bytes'] / (1 << 20):.1f} MiB sent, "
        f"{describe_downtime(status)}"
    )
    return 0


def describe_downtime(status: dict[str, Any]) -> str:
    """A completed migration's downtime in words, with where it went and, after a switch to
    post-copy, how the rest came in."""
    phases = ", ".join(f"{k} {v:.1f}" for k, v in status["downtime_phases_ms"].items())
    postcopy = (
        f"; post-copy: {status['postcopy_pages'] * 4} KiB after the switch, "
        f"{status['postcopy_requested_pages']} pages asked for by faults, all in after "
        f"{status['postcopy_ms']:.0f} ms"
        if status["postcopy"]
        else ""
    )
    devices = (
        f"; devices: {status['device_precopy_bytes']} bytes sent ahead, switch-over "
        f"acknowledged after {status['switchover_ack_ms']:.1f} ms"
        if status.get("switchover_acked")
        else ""
    )
    if status.get("device_state_bytes"):
        devices += f"; devices: {status['device_state_bytes']} bytes of state at the stop"
    return f"downtime {status['downtime_ms']:.1f} ms ({phases}){postcopy}{devices}"


class ProgressBar:
    """Copy progress: a tqdm bar on a terminal; on anything else, one line per round.

    tqdm rather than rich: it is one small module with no dependencies of its own, it draws
    on stderr and turns itself off where stderr is no terminal, which is all this needs."""

    def __init__(self) -> None:
        self._bar = None
        self._round = -1
        self._tty = sys.stderr.isatty()

    def update(self, status: dict) -> None:
        if status["status"] in ("setup", "none"):
            return
        if self._tty:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=status["ram_bytes"], unit="B", unit_scale=True, desc="migrating"
                )
            self._bar.total = max(self._bar.total, status["sent_bytes"])
            self._bar.n = status["sent_bytes"]
            self._bar.set_postfix(
                round=status["round"],
                dirty=f"{status['dirty_bytes'] >> 10}K",
                throttle=f"{status['throttle_percent']}%",
            )
        elif status["round"] != self._round:
            self._round = status["round"]
            print(
                f"pyvmm: migration round {status['round']}: {status['sent_bytes'] >> 20} MiB "
                f"sent, {status['dirty_bytes'] >> 10} KiB dirty"
                + (
                    f", guest throttled to {status['throttle_percent']}%"
                    if status["throttle_percent"]
                    else ""
                ),
                file=sys.stderr,
            )

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
