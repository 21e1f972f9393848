"""The host's side of a running lab: QEMU's console and the agent's frames relayed until the
command's exit status, the deadlines kept, and a lab that stopped early explained in one line.

A lab that hangs is asked where its CPUs are (`pyvmm.lab.monitor`) before it is stopped, so
that its timeout names more than the time it took.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.lab import chroot_init, monitor, protocol
from pyvmm.lab.errors import LabError, LabTimeout
from pyvmm.lab.protocol import Kind

if TYPE_CHECKING:
    from pyvmm.lab.launcher import LabOptions

log = logging.getLogger(__name__)

#: How long the guest may take from QEMU's start to the agent's first frame.
BOOT_TIMEOUT = 120.0

_CONSOLE_TAIL = 16384
_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\] ")  # a kernel log line on the console

#: Receives the command's output: (Kind.STDOUT or Kind.STDERR, bytes).
OutputSink = Callable[[Kind, bytes], None]


@dataclass(frozen=True)
class LabResult:
    exit_code: int
    boot_seconds: float  # QEMU's start to the agent's first frame
    seconds: float  # QEMU's start to the command's exit status


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Relay:
    """Moves bytes from QEMU's sockets to where they belong until the agent's last frame."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        console: socket.socket,
        agent: socket.socket,
        output: OutputSink,
        options: LabOptions,
        started: float,
        qmp: socket.socket | None = None,
    ) -> None:
        self.process = process
        self.console = console
        self.agent = agent
        self.qmp = qmp
        self.output = output
        self.options = options
        self.started = started
        self.last_output = started
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

    def _deadlines(self) -> list[float]:
        """The monotonic times by which something must have happened."""
        deadlines = [self.started + BOOT_TIMEOUT if self.boot_seconds is None else float("inf")]
        if self.options.timeout:
            deadlines.append(self.started + self.options.timeout)
        if self.options.silence and self.boot_seconds is not None:
            deadlines.append(self.last_output + self.options.silence)
        return deadlines

    def _remaining(self) -> float:
        return max(0.0, min(self._deadlines()) - time.monotonic())

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        if self.boot_seconds is None and elapsed >= BOOT_TIMEOUT:
            self._time_out(f"the lab did not boot within {BOOT_TIMEOUT:.0f} s", hint=True)
        if self.options.timeout and elapsed >= self.options.timeout:
            self._time_out(f"timed out after {self.options.timeout:g} s")
        silence = self.options.silence
        if silence and self.boot_seconds is not None and now - self.last_output >= silence:
            self._time_out(f"the command inside wrote nothing for {silence:g} s (the lab hung)")

    def _time_out(self, what: str, hint: bool = False) -> None:
        """Raise LabTimeout for `what`, with where the lab's CPUs are while QEMU still runs."""
        evidence = None
        if self.qmp is not None and self.process.poll() is None:
            evidence = monitor.hang_evidence(self.qmp, self.process.pid)
        cpus = f"; the lab's CPUs: {evidence.summary}" if evidence else ""
        message = f"{what}; QEMU stopped{cpus}{self._console_said()}"
        message += self._hint() if hint else ""
        raise LabTimeout(message, evidence.text if evidence else "")

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
                self.last_output = time.monotonic()
                uptime = json.loads(payload)["uptime"]
                log.info("lab up in %.1f s (guest uptime %.1f s)", self.boot_seconds, uptime)
            elif kind in (Kind.STDOUT, Kind.STDERR):
                self.last_output = time.monotonic()
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
        return "Kernel panic" not in console and chroot_init.FAIL_PREFIX not in console

    def failure(self, qemu_log: str, reset_log: Path) -> str:
        """One line on why the guest stopped before the command's exit status arrived."""
        console = self.console_tail.decode(errors="replace").splitlines()
        init_failures = [
            line.split(chroot_init.FAIL_PREFIX, 1)[1]
            for line in console
            if chroot_init.FAIL_PREFIX in line
        ]
        panics = [line.strip() for line in console if "Kernel panic" in line]
        # what QEMU said, but not its warnings (a deprecated option is not why a lab stopped)
        qemu_lines = [
            line.strip()
            for line in qemu_log.splitlines()
            if line.strip() and ": warning: " not in line
        ]
        if init_failures:
            why = init_failures[-1]
        elif panics:
            # where it crashed: the last oops' RIP, so that a report names the function
            rips = [line.split("RIP:", 1)[1].strip() for line in console if "RIP:" in line]
            why = panics[-1] + (f" (RIP: {rips[-1]})" if rips else "")
        elif qemu_lines:
            why = qemu_lines[-1]
        elif self.process.returncode is not None and self.process.returncode < 0:
            why = f"QEMU was killed by {signal_name(-self.process.returncode)}"
        elif self.process.returncode == 0:
            why = "the lab machine reset (QEMU exited 0 under -no-reboot; no panic was printed"
            with contextlib.suppress(OSError):
                if "Triple fault" in reset_log.read_text(errors="replace"):
                    why += "; a CPU triple-faulted, QEMU's reset log says"
            why += ")"
        else:
            why = f"QEMU exited with status {self.process.returncode}"
        return f"the lab stopped before the command finished: {why}{self._hint()}"
