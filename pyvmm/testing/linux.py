"""A shell script run in a Linux guest: the lab kernel, a busybox initramfs whose init runs the
script and powers off, and `pyvmm run` in a process of its own (a guest that crashes or hangs
cannot take the test's process with it). What the script printed and its exit status come back
from the console, between two marker lines the init prints around it.

Linux needs a KVM that can boot it: the lab's (inside `pyvmm lab`, or a `lab`-marked test), or a
host whose KVM runs Linux guests (a PVM host's does not).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvmm.initramfs import BUSYBOX_INIT_PRELUDE, busybox_initramfs
from pyvmm.lab.kernel import find_kernel
from pyvmm.lab.launcher import find_busybox

BEGIN = "pyvmm-script: begin"
STATUS = "pyvmm-script: status"
CMDLINE = "console=ttyS0 quiet panic=-1"
_END_OF_SCRIPT = "PYVMM_SCRIPT_EOF"


@dataclass(frozen=True)
class LinuxRun:
    """How a script's run went: `output` is what it printed (its stdout and stderr, as the
    console shows them), `status` its exit status (None if it never finished: see
    `console` and `pyvmm_stderr`, which has pyvmm's crash report)."""

    output: str
    status: int | None
    console: str
    pyvmm_exit: int
    pyvmm_stderr: str

    def summary(self, lines: int = 20) -> str:
        """The console's last lines and pyvmm's own words, for a failing test's report."""
        tail = "\n".join(self.console.splitlines()[-lines:])
        return f"pyvmm exit {self.pyvmm_exit}\n{self.pyvmm_stderr.strip()}\n--- console ---\n{tail}"


def init_script(script: str) -> str:
    """The busybox init: `script` written to /script, run by sh, its status printed, then an
    ACPI power-off (which ends pyvmm with exit code 0)."""
    if _END_OF_SCRIPT in script:
        raise ValueError(f"the script may not contain {_END_OF_SCRIPT}")
    return (
        f"{BUSYBOX_INIT_PRELUDE}"
        f"cat > /script <<'{_END_OF_SCRIPT}'\n{script}\n{_END_OF_SCRIPT}\n"
        f'echo "{BEGIN}"\n'
        "sh /script </dev/null 2>&1\n"  # (the console's tty never ends: no input for it)
        # on a line of its own even after output with no newline at its end (parse_console
        # takes that one newline off again)
        f'printf "\\n{STATUS} %d\\n" $?\n'
        "sleep 1\n"  # let the tty drain to the UART: poweroff -f does not wait for it
        "poweroff -f\n"
    )


def parse_console(console: str) -> tuple[str, int | None]:
    """What the script printed, and its status (None if the console never shows it)."""
    text = console.replace("\r\n", "\n")
    begin = text.find(BEGIN + "\n")
    if begin < 0:
        return "", None
    body = text[begin + len(BEGIN) + 1 :]
    found = re.search(rf"^{re.escape(STATUS)} (\d+)$", body, re.MULTILINE)
    if found is None:
        return body, None
    return body[: found.start()].removesuffix("\n"), int(found.group(1))


def boot(
    init: str,
    *,
    kernel: str | os.PathLike[str] | None = None,
    mem: str = "256M",
    cpus: int = 1,
    pyvmm_args: Sequence[str] = (),
    timeout: float = 150,
) -> subprocess.CompletedProcess[str]:
    """Boot Linux once under `pyvmm run` with `init` as its busybox init; how it ended (the
    console on stdout; pyvmm's crash report, if any, on stderr). `kernel`: a bzImage (default:
    the lab kernel, $PYVMM_LAB_KERNEL or pyvmm's cache); `pyvmm_args`: more `pyvmm run`
    options (devices, --vfio-pci, ...); pyvmm stops the guest after `timeout` s."""
    bzimage = Path(kernel) if kernel is not None else find_kernel()
    with tempfile.TemporaryDirectory(prefix="pyvmm-linux-") as tmp:
        initrd = Path(tmp) / "initrd.cpio"
        initrd.write_bytes(busybox_initramfs(find_busybox(), init))
        command = [
            sys.executable, "-m", "pyvmm", "run", "--timeout", str(timeout),
            "-k", str(bzimage), "-i", str(initrd), "-m", mem, "-c", str(cpus),
            "-p", CMDLINE, *pyvmm_args,
        ]  # fmt: skip
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout + 50,
            check=False,
            stdin=subprocess.DEVNULL,
        )


def run_script(script: str, **options: Any) -> LinuxRun:
    """Boot Linux under pyvmm with `script` as the whole of userspace; return how it went.
    `options` are `boot()`'s (kernel, mem, cpus, pyvmm_args, timeout)."""
    done = boot(init_script(script), **options)
    output, status = parse_console(done.stdout)
    return LinuxRun(output, status, done.stdout, done.returncode, done.stderr)
