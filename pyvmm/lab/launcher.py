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
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyvmm
from pyvmm.lab import initramfs, protocol, qemu
from pyvmm.lab.errors import LabCrashed, LabError, LabReset, LabTimeout, LabUnavailable
from pyvmm.lab.kernel import check_kernel, find_kernel
from pyvmm.lab.protocol import Kind

log = logging.getLogger(__name__)

#: How long the guest may take from QEMU's start to the agent's first frame.
BOOT_TIMEOUT = 120.0
#: How long QEMU may take to power off after the agent is done, before it is stopped.
POWEROFF_GRACE = 5.0

_CONSOLE_TAIL = 16384
_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\] ")  # a kernel log line on the console
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

#: Receives the command's output: (Kind.STDOUT or Kind.STDERR, bytes).
OutputSink = Callable[[Kind, bytes], None]


@dataclass(frozen=True)
class LabOptions:
    iommu: str = "intel"
    devices: tuple[str, ...] = ("edu",)
    kernel: str | None = None
    timeout: float | None = 600.0
    verbose: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    cpus: int = qemu.DEFAULT_CPUS  # the lab machine's (qemu.DEFAULT_CPUS says why one)


@dataclass(frozen=True)
class Prerequisites:
    qemu: str
    busybox: Path
    kernel: Path


@dataclass(frozen=True)
class LabResult:
    exit_code: int
    boot_seconds: float  # QEMU's start to the agent's first frame
    seconds: float  # QEMU's start to the command's exit status


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


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


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


def check_visible(paths: Mapping[str, Path]) -> None:
    """Refuse host paths the lab cannot see: those under the directories it mounts its own."""
    for what, path in paths.items():
        for own in initramfs.LAB_OWN_DIRS:
            if path == Path(own) or Path(own) in path.parents:
                raise LabError(f"{what} {path} is under {own}, which the lab has its own of")


@contextlib.contextmanager
def _prepare(
    prereq: Prerequisites,
    options: LabOptions,
    mode: str,
    command: Sequence[str],
    cwd: str,
    share: Path | None,
) -> Iterator[_Lab]:
    check_visible({"the interpreter": Path(sys.executable), "pyvmm": package_root()})
    # Byte-compile pyvmm here: inside, the checkout is read-only, and every Python process
    # there would compile each module it imports again (over a second per process under TCG).
    # A read-only checkout on the host only means the lab compiles, as before.
    compileall.compile_dir(package_root() / "pyvmm", quiet=2)
    with tempfile.TemporaryDirectory(prefix="pyvmm-lab-") as tmp:
        workdir = Path(tmp)
        share = share or workdir / "share"
        share.mkdir(exist_ok=True)
        lab = _Lab(workdir, share, workdir / "initrd.cpio", share / "spec.json")
        env = guest_env(os.environ, share, options.env)
        write_spec(lab.spec, mode, command, cwd, env, options.devices)
        config = initramfs.InitConfig(
            python=sys.executable, pythonpath=str(package_root()), share=str(share)
        )
        lab.initrd.write_bytes(initramfs.build(prereq.busybox, config))
        yield lab


def _machine(
    prereq: Prerequisites, options: LabOptions, lab: _Lab, *, console: str, agent: str
) -> qemu.MachineConfig:
    """The lab machine for `options`, its devices' disk images written into the boot's
    directory (removed with it)."""
    config = qemu.MachineConfig(
        kernel=prereq.kernel,
        initrd=lab.initrd,
        share=lab.share,
        console=console,
        agent=agent,
        scratch=lab.workdir,
        iommu=options.iommu,
        devices=options.devices,
        cpus=options.cpus,
        verbose=options.verbose,
    )
    qemu.create_disk_images(config)
    return config


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
        for sock in (console, console_guest, agent, agent_guest):
            stack.enter_context(sock)
        config = _machine(
            prereq,
            options,
            lab,
            console=f"socket,fd={console_guest.fileno()}",
            agent=f"socket,fd={agent_guest.fileno()}",
        )
        qemu_log = stack.enter_context((lab.workdir / "qemu.log").open("w+b"))
        started = time.monotonic()
        process = stack.enter_context(
            qemu_process(
                qemu.command(prereq.qemu, config),
                pass_fds=(console_guest.fileno(), agent_guest.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=None if options.verbose else qemu_log,
                start_new_session=True,  # Ctrl-C is ours to handle; QEMU is stopped in order
            )
        )
        console_guest.close()
        agent_guest.close()
        relay = _Relay(process, console, agent, output, options, started)
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


class _Relay:
    """Moves bytes from QEMU's sockets to where they belong until the agent's last frame."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        console: socket.socket,
        agent: socket.socket,
        output: OutputSink,
        options: LabOptions,
        started: float,
    ) -> None:
        self.process = process
        self.console = console
        self.agent = agent
        self.output = output
        self.options = options
        self.started = started
        self.console_tail = bytearray()
        self.frames = protocol.FrameReader()
        self.boot_seconds: float | None = None
        self.exit_code: int | None = None
        self.error: str | None = None

    def run(self) -> LabResult | None:
        """The result, or None if QEMU exited before the agent's last frame."""
        pidfd = os.pidfd_open(self.process.pid)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.console, selectors.EVENT_READ, self._on_console)
                selector.register(self.agent, selectors.EVENT_READ, self._on_agent)
                selector.register(pidfd, selectors.EVENT_READ, None)
                while self.exit_code is None and self.error is None:
                    if not selector.get_map().keys() - {pidfd}:
                        return None  # QEMU exited and both sockets are drained
                    for key, _ in selector.select(self._remaining()):
                        if key.data is None:
                            selector.unregister(pidfd)  # keep reading until the sockets' EOF
                        else:
                            key.data(selector)
                    self._check_deadlines()
        finally:
            os.close(pidfd)
        if self.error is not None:
            raise LabError(self.error)
        assert self.exit_code is not None and self.boot_seconds is not None
        return LabResult(self.exit_code, self.boot_seconds, time.monotonic() - self.started)

    def _remaining(self) -> float:
        deadlines = [BOOT_TIMEOUT if self.boot_seconds is None else float("inf")]
        if self.options.timeout:
            deadlines.append(self.options.timeout)
        return max(0.0, min(deadlines) - (time.monotonic() - self.started))

    def _check_deadlines(self) -> None:
        elapsed = time.monotonic() - self.started
        if self.boot_seconds is None and elapsed >= BOOT_TIMEOUT:
            raise LabTimeout(f"the lab did not boot within {BOOT_TIMEOUT:.0f} s{self._hint()}")
        if self.options.timeout and elapsed >= self.options.timeout:
            raise LabTimeout(
                f"timed out after {self.options.timeout:g} s; QEMU stopped{self._console_said()}"
            )

    def _console_said(self) -> str:
        """The lab kernel's last lines on its console, if any (with `quiet`, its warnings:
        a stall, a lockup, an oops), for a timeout's message."""
        console = self.console_tail.decode(errors="replace").splitlines()
        kernel = [line.strip() for line in console if _KERNEL_LINE.match(line)]
        return f"; its console last said: {' | '.join(kernel[-2:])}" if kernel else ""

    def _on_console(self, selector: selectors.BaseSelector) -> None:
        data = self.console.recv(65536)
        if not data:
            selector.unregister(self.console)
            return
        self.console_tail += data
        del self.console_tail[:-_CONSOLE_TAIL]
        if self.options.verbose:
            sys.stderr.buffer.write(data)
            sys.stderr.flush()

    def _on_agent(self, selector: selectors.BaseSelector) -> None:
        data = self.agent.recv(65536)
        if not data:
            selector.unregister(self.agent)
            return
        for kind, payload in self.frames.feed(data):
            if kind is Kind.HELLO:
                self.boot_seconds = time.monotonic() - self.started
                uptime = json.loads(payload)["uptime"]
                log.info("lab up in %.1f s (guest uptime %.1f s)", self.boot_seconds, uptime)
            elif kind in (Kind.STDOUT, Kind.STDERR):
                self.output(kind, payload)
            elif kind is Kind.EXIT:
                self.exit_code = int(json.loads(payload)["code"])
            elif kind is Kind.ERROR:
                self.error = payload.decode(errors="replace")

    def _hint(self) -> str:
        return "" if self.options.verbose else " (rerun with --verbose to see its console)"

    def reset_itself(self) -> bool:
        """Whether the lab's kernel went without a word: no panic, no init failure."""
        console = self.console_tail.decode(errors="replace")
        return "Kernel panic" not in console and initramfs.FAIL_PREFIX not in console

    def failure(self, qemu_log: str, reset_log: Path) -> str:
        """One line on why the guest stopped before the command's exit status arrived."""
        console = self.console_tail.decode(errors="replace").splitlines()
        init_failures = [
            line.split(initramfs.FAIL_PREFIX, 1)[1]
            for line in console
            if initramfs.FAIL_PREFIX in line
        ]
        panics = [line.strip() for line in console if "Kernel panic" in line]
        qemu_lines = [line.strip() for line in qemu_log.splitlines() if line.strip()]
        if init_failures:
            why = init_failures[-1]
        elif panics:
            # where it crashed: the last oops' RIP, so that a report names the function
            rips = [line.split("RIP:", 1)[1].strip() for line in console if "RIP:" in line]
            why = panics[-1] + (f" (RIP: {rips[-1]})" if rips else "")
        elif qemu_lines:
            why = qemu_lines[-1]
        elif self.process.returncode is not None and self.process.returncode < 0:
            why = f"QEMU was killed by {_signal_name(-self.process.returncode)}"
        elif self.process.returncode == 0:
            why = "the lab machine reset (QEMU exited 0 under -no-reboot; no panic was printed"
            with contextlib.suppress(OSError):
                if "Triple fault" in reset_log.read_text(errors="replace"):
                    why += "; a CPU triple-faulted, QEMU's reset log says"
            why += ")"
        else:
            why = f"QEMU exited with status {self.process.returncode}"
        return f"the lab stopped before the command finished: {why}{self._hint()}"


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
