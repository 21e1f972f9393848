"""Booting the lab and running one command (or a shell) inside it.

The host side of a lab run: check the prerequisites, write the run's spec and initramfs into a
temporary directory, start QEMU with the serial console and the agent's port on socketpairs,
then relay the agent's frames (the command's stdout and stderr, then its exit status) until the
command is done. QEMU is stopped whatever happens: it gets SIGTERM, then SIGKILL, when the run
ends, times out, is interrupted or raises, and PR_SET_PDEATHSIG kills it should this process die
without cleaning up.
"""

from __future__ import annotations

import compileall
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyvmm
from pyvmm.lab import chroot_init, qemu, tsc
from pyvmm.lab.errors import LabCrashed, LabError, LabReset, LabUnavailable
from pyvmm.lab.kernel import ENV_KERNEL, check_kernel, find_kernel
from pyvmm.lab.protocol import Kind
from pyvmm.lab.relay import LabResult, OutputSink, Relay

log = logging.getLogger(__name__)

#: How long QEMU may take to power off after the agent is done, before it is stopped.
POWEROFF_GRACE = 5.0

#: The signals QEMU dies of when it crashes (an assertion aborts); SIGKILL or SIGTERM from the
#: OOM killer or an operator are not crashes.
_CRASH_SIGNALS = frozenset(
    {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}
)
_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

#: Host variables the command inside sees; everything else stays outside.
_PASSED_ENV = frozenset(
    {
        *("HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TERM", "TZ", "CI", "COLUMNS"),
        *("PYTHONPATH", "PYTHONHASHSEED", "PYTHONWARNINGS"),
        *("NO_COLOR", "FORCE_COLOR", "PY_COLORS"),
    }
)
_PASSED_PREFIXES = ("LC_", "PYVMM_", "PYTEST_", "HYPOTHESIS_")


@dataclass(frozen=True)
class LabOptions:
    iommu: str = "intel"
    devices: tuple[str, ...] = ("edu",)
    kernel: str | None = None
    timeout: float | None = 600.0
    verbose: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    cpus: int = qemu.DEFAULT_CPUS  # the lab machine's (qemu.DEFAULT_CPUS says why one)
    #: Stop the lab when the command has written nothing for this long (a lab hung as a whole;
    #: for a command that says it is alive more often than this).
    silence: float | None = None
    #: Tell the lab kernel its TSC runs this many ppm off its real rate: a stale calibration,
    #: for the test of what pyvmm says when KVM freezes a vCPU's TSC (pyvmm.lab.tsc).
    tsc_skew_ppm: int = 0


@dataclass(frozen=True)
class Prerequisites:
    qemu: str
    busybox: Path
    kernel: Path


def is_static_elf(path: Path) -> bool:
    """True if `path` is an ELF executable without a program interpreter (PT_INTERP)."""
    with path.open("rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit only: the lab is x86_64
            return False
        phoff = int.from_bytes(header[32:40], "little")
        phentsize = int.from_bytes(header[54:56], "little")
        phnum = int.from_bytes(header[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(
        int.from_bytes(table[i : i + 4], "little") != pt_interp
        for i in range(0, len(table), phentsize)
    )


def find_busybox() -> Path:
    candidates = [shutil.which("busybox"), *_BUSYBOX_CANDIDATES]
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if path.is_file() and is_static_elf(path):
            return path
    raise LabUnavailable("no static busybox installed (run scripts/setup-lab: busybox-static)")


def prerequisites(options: LabOptions, environ: Mapping[str, str] = os.environ) -> Prerequisites:
    """Everything the lab needs on this host, or the one-line reason it cannot start."""
    qemu.check_iommu(options.iommu)
    qemu.check_devices(options.devices)
    if options.cpus < 1:
        raise LabError(f"the lab machine needs at least 1 CPU, not {options.cpus}")
    prereq = Prerequisites(
        qemu=qemu.find_qemu(),
        busybox=find_busybox(),
        kernel=find_kernel(options.kernel, environ),
    )
    check_kernel(prereq.kernel, options.iommu)
    return prereq


def package_root() -> Path:
    """The directory that holds the `pyvmm` package: the checkout, for a development install."""
    return Path(pyvmm.__file__).resolve().parent.parent


def guest_env(
    environ: Mapping[str, str], share: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of the command inside the lab.

    The interpreter's own bin directory leads PATH, so that `python3` and `pytest` inside are
    this interpreter's and not a version manager's shim; the checkout leads PYTHONPATH.
    """
    env = {k: v for k, v in environ.items() if k in _PASSED_ENV or k.startswith(_PASSED_PREFIXES)}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root()), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"  # output streams as it is written, not when a buffer fills
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the host's root is read-only inside
    env["PYVMM_IN_LAB"] = "1"
    env["PYVMM_LAB_SHARE"] = str(share)
    env.update(extra or {})
    return env


def device_request(device: qemu.LabDevice) -> dict[str, Any]:
    """What the agent needs to find and bind `device` (see `agent.bind_devices`)."""
    request: dict[str, Any] = {
        "name": device.name,
        "vendor": device.vendor,
        "device": device.device,
    }
    if device.vfs:
        request.update(vfs=device.vfs, vf_name=device.vf_name)
    return request


def write_spec(
    path: Path,
    mode: str,
    command: Sequence[str],
    cwd: str,
    env: Mapping[str, str],
    devices: Sequence[str],
) -> None:
    size = shutil.get_terminal_size()
    spec = {
        "mode": mode,
        "command": list(command),
        "cwd": cwd,
        "env": dict(env),
        "port": qemu.AGENT_PORT,
        "devices": [device_request(qemu.DEVICES[name]) for name in devices],
        "winsize": [size.lines, size.columns],
    }
    path.write_text(json.dumps(spec))


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


@contextlib.contextmanager
def qemu_process(argv: Sequence[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Start QEMU; on leaving, stop it (SIGTERM, then SIGKILL) if it is still running."""
    log.debug("starting %s", " ".join(argv))
    try:
        process = subprocess.Popen(argv, preexec_fn=_die_with_parent, **popen)
    except OSError as exc:
        raise LabError(f"cannot start {argv[0]}: {exc.strerror}") from exc
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _write_output(kind: Kind, data: bytes) -> None:
    stream = sys.stdout if kind is Kind.STDOUT else sys.stderr
    stream.buffer.write(data)
    stream.flush()


@dataclass
class _Lab:
    """The files of one lab boot, in a temporary directory."""

    workdir: Path
    share: Path
    initrd: Path
    spec: Path
    host_dirs: tuple[Path, ...]  # shared into the lab again (hidden_dirs)


def needed_paths(cwd: str, kernel: Path) -> dict[str, Path]:
    """The host paths a command in the lab uses: the interpreter and its environment, pyvmm,
    the working directory, and the lab kernel (Linux guests inside boot it too)."""
    return {
        "the interpreter": Path(sys.executable),
        "its environment": Path(sys.prefix),
        "pyvmm": package_root(),
        "the working directory": Path(cwd),
        "the lab kernel": kernel.resolve(),
    }


def hidden_dirs(paths: Mapping[str, Path]) -> tuple[Path, ...]:
    """The host directories to share into the lab again, read-only at their own paths, for
    `paths` (a file's directory) under /tmp or /run, which the lab has its own of: a checkout,
    a virtualenv or a working directory there works as anywhere else. Nested ones are shared
    once. A path under /proc, /sys or /dev cannot be: LabUnavailable, saying so."""
    found: list[Path] = []
    for what, path in paths.items():
        shared = path if path.is_dir() else path.parent
        for own in chroot_init.LAB_OWN_DIRS:
            if shared != Path(own) and Path(own) not in shared.parents:
                continue
            if own not in chroot_init.REMOUNTABLE_DIRS or shared == Path(own):  # (not all of it)
                raise LabUnavailable(
                    f"{what} {path} is under {own}, which the lab has its own of: move it"
                )
            found.append(shared)
    return tuple(sorted({d for d in found if not any(o in d.parents for o in found if o != d)}))


@contextlib.contextmanager
def _prepare(
    prereq: Prerequisites,
    options: LabOptions,
    mode: str,
    command: Sequence[str],
    cwd: str,
    share: Path | None,
) -> Iterator[_Lab]:
    host_dirs = hidden_dirs(needed_paths(cwd, prereq.kernel))
    # Byte-compile pyvmm here: inside, the checkout is read-only, and every Python process
    # there would compile each module it imports again (over a second per process under TCG).
    # A read-only checkout on the host only means the lab compiles, as before.
    compileall.compile_dir(package_root() / "pyvmm", quiet=2)
    with tempfile.TemporaryDirectory(prefix="pyvmm-lab-") as tmp:
        workdir = Path(tmp)
        share = share or workdir / "share"
        share.mkdir(exist_ok=True)
        lab = _Lab(workdir, share, workdir / "initrd.cpio", share / "spec.json", host_dirs)
        env = guest_env(os.environ, share, options.env)
        # inside, the kernel for Linux guests (pyvmm.testing.linux) is the lab's own, unless
        # one is named
        env.setdefault(ENV_KERNEL, str(prereq.kernel.resolve()))
        write_spec(lab.spec, mode, command, cwd, env, options.devices)
        config = chroot_init.InitConfig(
            python=sys.executable,
            pythonpath=str(package_root()),
            share=str(share),
            host_dirs=tuple(map(str, host_dirs)),
        )
        lab.initrd.write_bytes(chroot_init.build(prereq.busybox, config))
        yield lab


def _machine(
    prereq: Prerequisites,
    options: LabOptions,
    lab: _Lab,
    *,
    console: str,
    agent: str,
    monitor: str | None = None,
) -> qemu.LabMachine:
    """The lab machine for `options`, its devices' disk images written into the boot's
    directory (removed with it)."""
    config = qemu.LabMachine(
        kernel=prereq.kernel,
        initrd=lab.initrd,
        share=lab.share,
        console=console,
        agent=agent,
        monitor=monitor,
        scratch=lab.workdir,
        iommu=options.iommu,
        devices=options.devices,
        cpus=options.cpus,
        verbose=options.verbose,
        tsc_khz=_lab_tsc_khz(options.tsc_skew_ppm),
        host_dirs=lab.host_dirs,
    )
    qemu.create_disk_images(config)
    return config


def _lab_tsc_khz(skew_ppm: int) -> int | None:
    khz = tsc.host_tsc_khz()
    if khz is None:
        if skew_ppm:
            raise LabUnavailable("this host's TSC rate is unknown, so it cannot be skewed")
        return None
    return tsc.skewed(khz, skew_ppm)


def run(
    command: Sequence[str],
    options: LabOptions,
    *,
    cwd: str | None = None,
    output: OutputSink = _write_output,
    share: Path | None = None,
) -> LabResult:
    """Boot the lab, run `command` in it and return its exit status.

    `share` is a host directory the command can write to, mounted at the same path inside; by
    default a temporary one. Raises `LabError` (or a subclass) when the lab cannot run it.
    """
    if not command:
        raise LabError("no command given (use: pyvmm lab run -- CMD ...)")
    prereq = prerequisites(options)
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(
            _prepare(prereq, options, "run", command, cwd or os.getcwd(), share)
        )
        console, console_guest = socket.socketpair()
        agent, agent_guest = socket.socketpair()
        qmp, qmp_guest = socket.socketpair()  # QEMU's monitor: where the CPUs are, on a hang
        for sock in (console, console_guest, agent, agent_guest, qmp, qmp_guest):
            stack.enter_context(sock)
        config = _machine(
            prereq,
            options,
            lab,
            console=f"socket,fd={console_guest.fileno()}",
            agent=f"socket,fd={agent_guest.fileno()}",
            monitor=f"socket,fd={qmp_guest.fileno()}",
        )
        qemu_log = stack.enter_context((lab.workdir / "qemu.log").open("w+b"))
        started = time.monotonic()
        process = stack.enter_context(
            qemu_process(
                qemu.command(prereq.qemu, config),
                pass_fds=(console_guest.fileno(), agent_guest.fileno(), qmp_guest.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=None if options.verbose else qemu_log,
                start_new_session=True,  # Ctrl-C is ours to handle; QEMU is stopped in order
            )
        )
        for guest_end in (console_guest, agent_guest, qmp_guest):
            guest_end.close()
        relay = Relay(process, console, agent, output, options, started, qmp)
        result = relay.run()
        try:
            process.wait(POWEROFF_GRACE)
        except subprocess.TimeoutExpired:
            log.debug("QEMU still running %.0f s after the command; stopping it", POWEROFF_GRACE)
        if result is None:
            qemu_log.seek(0)
            why = relay.failure(qemu_log.read().decode(errors="replace"), qemu.reset_log(config))
            if process.returncode is not None and -process.returncode in _CRASH_SIGNALS:
                raise LabCrashed(why)
            if process.returncode == 0 and relay.reset_itself():
                raise LabReset(why)
            raise LabError(why)
        return result


def shell(options: LabOptions, *, cwd: str | None = None) -> int:
    """Boot the lab with its serial console on this terminal and a shell on it."""
    prereq = prerequisites(options)
    shell_command = [os.environ.get("SHELL") or "/bin/sh"]
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(
            _prepare(prereq, options, "shell", shell_command, cwd or os.getcwd(), None)
        )
        config = _machine(prereq, options, lab, console="stdio,mux=on,signal=off", agent="null")
        print(
            "pyvmm lab: booting; leave with `exit` (or Ctrl-A x to stop QEMU)",
            file=sys.stderr,
            flush=True,
        )
        process = stack.enter_context(qemu_process(qemu.command(prereq.qemu, config)))
        return process.wait()
