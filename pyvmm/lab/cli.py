"""`pyvmm lab run` and `pyvmm lab shell`: the command-line side of the lab."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

from pyvmm.lab import launcher, qemu
from pyvmm.lab.errors import LabError, LabTimeout

log = logging.getLogger(__name__)

_EXIT_TIMEOUT = 124  # as timeout(1)
_EXIT_INTERRUPTED = 130
_EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports it


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `lab run` and `lab shell` to a top-level argparse subparsers object."""
    lab = subparsers.add_parser(
        "lab",
        help="run commands in the lab (QEMU with an emulated IOMMU, VFIO devices and KVM)",
        description="The lab boots QEMU (TCG) with the lab kernel, an emulated IOMMU and "
        "emulated PCI devices bound to vfio-pci, with this host's root visible read-only.",
    )
    commands = lab.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run CMD inside the lab and return its exit status",
        description="Boot the lab, run CMD there in the same directory, stream its output "
        "and exit with its status.",
    )
    _machine_options(run)
    run.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="stop the lab after S seconds (default %(default)g; 0: never)",
    )
    run.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a variable for CMD (repeatable)",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    run.set_defaults(func=_run)

    shell = commands.add_parser(
        "shell",
        help="an interactive shell in the lab, on its serial console",
        description="Boot the lab with its serial console on this terminal and a shell on it. "
        "Leave with `exit`; Ctrl-A x stops QEMU.",
    )
    _machine_options(shell)
    shell.set_defaults(func=_shell)


def _machine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--iommu",
        choices=(*qemu.IOMMUS, "amd"),
        default="intel",
        help="the emulated IOMMU (default %(default)s; amd is refused: broken in QEMU 10.0)",
    )
    parser.add_argument(
        "--device",
        dest="devices",
        action="append",
        choices=tuple(qemu.DEVICES),
        metavar="{" + ",".join(qemu.DEVICES) + "}",
        help="an emulated PCI device to bind to vfio-pci (igb: its VFs; repeatable; default: edu)",
    )
    parser.add_argument(
        "--kernel",
        metavar="PATH",
        help="the lab kernel (default: $PYVMM_LAB_KERNEL, then ~/.cache/pyvmm/lab/bzImage)",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        default=qemu.DEFAULT_CPUS,
        metavar="N",
        help="the lab machine's CPUs (default %(default)s: with more, QEMU 10.0's TCG now and "
        "then crashes nested guests; see docs/lab-crashes.md)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        dest="lab_verbose",
        action="store_true",
        help="show the guest's console and QEMU's messages on stderr",
    )


def _options(
    args: argparse.Namespace, timeout: float | None, env: dict[str, str]
) -> launcher.LabOptions:
    return launcher.LabOptions(
        iommu=args.iommu,
        devices=tuple(args.devices or ("edu",)),
        kernel=args.kernel,
        timeout=timeout,
        verbose=args.lab_verbose,
        env=env,
        cpus=args.cpus,
    )


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise LabError(f"--env {pair!r}: expected NAME=VALUE")
        env[name] = value
    return env


def _report(exc: LabError) -> int:
    print(f"pyvmm lab: {exc}", file=sys.stderr)
    return _EXIT_TIMEOUT if isinstance(exc, LabTimeout) else 1


@contextlib.contextmanager
def _orderly_termination() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit, so that QEMU and the temporary files go too."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        options = _options(args, args.timeout or None, _parse_env(args.env))
        with _orderly_termination():
            result = launcher.run(command, options)
    except LabError as exc:
        return _report(exc)
    except KeyboardInterrupt:
        print("pyvmm lab: interrupted; QEMU stopped", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (`| head`): stop quietly, as a shell tool does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _EXIT_BROKEN_PIPE
    log.info(
        "exit status %d; booted in %.1f s, %.1f s in all",
        result.exit_code,
        result.boot_seconds,
        result.seconds,
    )
    return result.exit_code


def _shell(args: argparse.Namespace) -> int:
    try:
        with _orderly_termination():
            return launcher.shell(_options(args, None, {}))
    except LabError as exc:
        return _report(exc)
