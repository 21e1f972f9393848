"""`pyvmm run`: boot a test guest or a Linux kernel and exit with the guest's exit code.

pyvmm run GUEST.elf [-m 64M] [-c N] [--console stdio|file:PATH|socket:PATH] [--control PATH]
pyvmm run --demo
pyvmm run -k bzImage|vmlinux [-i initrd] [-p "console=ttyS0 ..."] [-m 256M] [-c 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyvmm.board.machine import Machine, StopReason
from pyvmm.errors import ConfigError
from pyvmm.guest_files import demo_guest
from pyvmm.machine.console import Console, open_console
from pyvmm.machine.threads import idle_priority

if TYPE_CHECKING:
    import socket

DEFAULT_CMDLINE = "console=ttyS0 panic=-1"
CRASH_CONSOLE_LINES = 12  # of the guest's console, after a crash


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from pyvmm.commands.options import add_host_moves, parse_size

    run = subparsers.add_parser(
        "run",
        help="boot a guest",
        description="Boot an ELF64 test guest, or Linux (-k: a bzImage, or a vmlinux with a PVH "
        "note). Exits with the code a test guest writes to the debug-exit port (0x501), 0 when "
        "the guest powers off or resets, 1 on error, 124 on --timeout, 130 on Ctrl-C.",
    )
    run.add_argument("image", metavar="GUEST.elf", nargs="?", help="ELF64 test guest to boot")
    run.add_argument(
        "--demo", action="store_true", help="boot the hello guest pyvmm carries (a first try)"
    )
    run.add_argument("-k", "--kernel", help="Linux kernel: bzImage, or vmlinux with PVH entry")
    run.add_argument("-i", "--initrd", help="initramfs for the kernel")
    run.add_argument(
        "-p", "--params", default=None, help=f'kernel command line (default "{DEFAULT_CMDLINE}")'
    )
    run.add_argument(
        "-m", "--mem", type=parse_size, default=None, help="RAM (default 64M, 256M with -k)"
    )
    run.add_argument("-c", "--cpus", type=int, default=None, help="number of vCPUs (default 1)")
    run.add_argument(
        "--console",
        default=None,
        help="where COM1 goes: stdio (default; with --incoming, where the source had it), "
        "file:PATH or socket:PATH",
    )
    run.add_argument(
        "--incoming",
        metavar="URI",
        help="instead of booting, wait at unix:PATH or tcp:HOST:PORT for a machine migrated "
        "there (pyvmm migrate); -m and -c, if given, must match it",
    )
    add_host_moves(run)
    run.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="FILE[,ro]",
        help="virtio-blk disk backed by a raw image file (repeatable; ',ro' for read-only)",
    )
    run.add_argument("--rng", action="store_true", help="virtio-rng entropy device")
    run.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="tap:NAME",
        help="virtio-net on an existing or new tap interface (repeatable)",
    )
    run.add_argument(
        "--vfio-pci",
        action="append",
        default=[],
        metavar="BDF",
        help="pass a host PCI device bound to vfio-pci through to the guest (repeatable)",
    )
    run.add_argument(
        "--vfio-dev",
        action="append",
        default=[],
        metavar="SYSFSPATH",
        help="pass a VFIO device through by its sysfs path, e.g. an mdev "
        "/sys/bus/mdev/devices/UUID (repeatable)",
    )
    run.add_argument(
        "--vfio-backend",
        choices=("iommufd", "container"),
        default=None,
        help="how devices are opened (default: iommufd where /dev/iommu and the device's "
        "cdev exist, else the legacy container)",
    )
    page_table = run.add_mutually_exclusive_group()
    page_table.add_argument(
        "--hwpt",
        action="store_true",
        help="iommufd: attach the devices to an explicitly allocated HWPT over the guest-RAM "
        "IOAS instead of the IOAS itself (replaceable while the guest runs: pyvmm ctl)",
    )
    page_table.add_argument(
        "--viommu",
        choices=("none", "nested", "virtio"),
        default="none",
        help="iommufd: nested puts the devices on the stage 2 of hardware nesting (a "
        "NEST_PARENT HWPT, a vIOMMU and a vDEVICE each; refused where the IOMMU cannot nest); "
        "virtio gives the guest a virtio-iommu in front of them (each guest domain an IOAS "
        "and HWPT of its own)",
    )
    add_run_options(run)
    run.set_defaults(func=cmd_run)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options of a running machine, for `run` and `restore` alike."""
    parser.add_argument(
        "--timeout", type=float, default=None, help="stop the guest after S seconds"
    )
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="serve the control socket (JSON lines) at PATH: pyvmm ctl, snapshot, migrate",
    )
    parser.add_argument(
        "--exit-stats",
        action="store_true",
        help="on exit, print to stderr the exits that reached pyvmm, by device and offset",
    )


def add_devices(machine: Machine, args: argparse.Namespace) -> None:
    """Add the devices the options ask for, in a stable order (disks, rng, nets, assigned
    devices). Each is owned by the machine once added, so an error in a later option leaks
    nothing."""
    for spec in args.disk:
        path, _, options = spec.partition(",")
        if options not in ("", "ro"):
            raise ConfigError(f"bad --disk {spec!r}: use FILE or FILE,ro")
        machine.add_device("virtio-blk", path=path, read_only=options == "ro")
    if args.rng:
        machine.add_device("virtio-rng")
    for spec in args.net:
        kind, _, name = spec.partition(":")
        if kind != "tap" or not name:
            raise ConfigError(f"bad --net {spec!r}: use tap:NAME")
        machine.add_device("virtio-net", tap=name)
    page_table = {"hwpt": True} if args.hwpt else {}
    if args.viommu != "none":
        page_table = {"viommu": args.viommu}
    if page_table and not (args.vfio_pci or args.vfio_dev):
        raise ConfigError("--hwpt and --viommu are for passed-through devices: add --vfio-pci BDF")
    for host in (*args.vfio_pci, *args.vfio_dev):
        machine.add_device("vfio-pci", host=host, backend=args.vfio_backend, **page_table)


def cmd_run(args: argparse.Namespace) -> int:
    if args.incoming:
        return run_incoming(args)
    if args.vfio_host:
        raise ConfigError(
            "--vfio-host moves the devices of a machine that comes from elsewhere: use it "
            "with --incoming (or pyvmm restore)"
        )
    if args.demo:
        if args.image or args.kernel:
            raise ConfigError("--demo boots pyvmm's own guest: give no GUEST.elf or -k with it")
        args.image = demo_guest()
    if (args.image is None) == (args.kernel is None):
        raise ConfigError("give one thing to boot: a test guest (GUEST.elf) or a kernel (-k)")
    if args.kernel is None and (args.initrd or args.params is not None):
        raise ConfigError("-i and -p go with a kernel (-k)")
    mem = args.mem or ((256 << 20) if args.kernel else (64 << 20))
    args.console = args.console or "stdio"
    console = open_console(args.console)
    with Machine(
        mem_size=mem, vcpus=args.cpus or 1, console=console, trace_exits=args.exit_stats
    ) as machine:
        add_devices(machine, args)
        if args.kernel:
            params = DEFAULT_CMDLINE if args.params is None else args.params
            machine.load_linux(args.kernel, args.initrd, params)
        else:
            machine.load_elf(args.image)
        return run_until_done(machine, args)


def run_incoming(args: argparse.Namespace) -> int:
    """`run --incoming`: take in a migrated machine, run it, and let the source stop."""
    from pyvmm.machine.config import MachineConfig
    from pyvmm.migration import destination
    from pyvmm.migration.transport import Endpoint

    given = [args.image, args.kernel, args.initrd, args.params, *args.disk, args.rng, *args.net]
    if any(given) or args.vfio_pci or args.vfio_dev:
        raise ConfigError("--incoming takes its machine from the source: give no guest or devices")

    def expect(config: MachineConfig) -> str:
        problems = []
        if args.mem is not None and args.mem != config.mem_size:
            problems.append(f"it has {config.mem_size >> 20} MiB of RAM, not {args.mem >> 20} MiB")
        if args.cpus is not None and args.cpus != config.vcpus:
            problems.append(f"it has {config.vcpus} vCPUs, not {args.cpus}")
        return "; ".join(problems)

    def console(info: dict[str, object]) -> Console:
        args.console = inherited_console(args.console, info)
        return open_console(args.console)

    control = None
    if args.control:  # now: once the machine has come across, the source cannot have it back
        from pyvmm.control.server import listen_control

        control = listen_control(args.control)
    try:
        incoming = destination.receive(
            Endpoint.parse(args.incoming),
            console,
            expect=expect,
            trace_exits=args.exit_stats,
            hosts=dict(args.vfio_host),
        )
    except BaseException:
        if control is not None:
            control.close()
            with contextlib.suppress(OSError):
                os.unlink(args.control)
        raise
    with incoming.machine as machine:
        return run_until_done(
            machine, args, start=incoming.start, started=incoming.report_running, control=control
        )


def inherited_console(given: str | None, info: dict[str, object]) -> str:
    """The --console of a restored or migrated machine: as given, else where the original
    machine's went (its INFO), else stdio."""
    if given is not None:
        return given
    recorded = info.get("console")
    return recorded if isinstance(recorded, str) and recorded != "capture" else "stdio"


def run_until_done(
    machine: Machine,
    args: argparse.Namespace,
    *,
    start: Callable[[], None] | None = None,
    started: Callable[[], None] | None = None,
    control: socket.socket | None = None,
) -> int:
    """Run the machine (serving --control meanwhile, on `control` if it listens already) until
    it ends; report how, as the exit code and, unless the guest ended it, one line on stderr.
    `start` starts it (by default `machine.start`); `started` is called once the vCPUs run."""
    server = None
    if args.control:
        from pyvmm.control.server import ControlServer  # (start-up time: only when asked)

        server = ControlServer(machine, args.control, args.console, listener=control)
    try:
        (start or machine.start)()
        if started is not None:
            started()
        result = machine.wait(timeout=args.timeout)
        if server is not None and server.migrated_away:
            # The machine runs at the destination: all that is left here is teardown (its RAM
            # freed, the VM and devices closed), which nobody waits for. On the same host it
            # takes CPU from the guest now running there: in the lab (bench-migrate-lab
            # --mtty, one CPU) the guest's gap at the switch-over was 1.96 s median with it,
            # 0.63 s with it on idle time only.
            idle_priority()
    finally:
        if server is not None:
            server.close()
    if args.exit_stats:
        print_exit_stats(machine)
    if result.reason in (StopReason.ERROR, StopReason.TRIPLE_FAULT, StopReason.STOPPED):
        print(f"pyvmm: {result.reason.value}: {result.detail}", file=sys.stderr)
        for line in (*result.crash, *result.vcpus):
            print(f"pyvmm:   {line}", file=sys.stderr)
        if result.crash:
            print("pyvmm:   the console's last lines:", file=sys.stderr)
            for line in machine.console_tail.lines(CRASH_CONSOLE_LINES):
                print(f"pyvmm:   | {line}", file=sys.stderr)
    return result.exit_code


def print_exit_stats(machine: Machine) -> None:
    rows = machine.exits.summary()
    total = sum(count for _, _, count in rows)
    print(f"pyvmm: {total} exits to pyvmm, by kind and place:", file=sys.stderr)
    for kind, where, count in rows:
        print(f"{count:>10} {100 * count / total:5.1f}%  {kind:5} {where}", file=sys.stderr)
    viommu = machine.viommu_domains
    if viommu is not None:
        domains = viommu["domains"]
        assert isinstance(domains, list)
        print(
            f"pyvmm: virtio-iommu: {viommu['created']} domains made ({len(domains)} left), "
            f"{viommu['maps']} mappings made, {viommu['unmaps']} removed, "
            f"bypass {'on' if viommu['bypass'] else 'off'}",
            file=sys.stderr,
        )
        for domain in domains:
            print(
                f"pyvmm:   domain {domain['id']}: endpoints "
                f"{', '.join(f'{e:#x}' for e in domain['endpoints'])}, "
                f"{'bypass' if domain['bypass'] else str(domain['mappings']) + ' mappings'}",
                file=sys.stderr,
            )
