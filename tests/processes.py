"""pyvmm's command line as scripts use it, run in processes of their own (`python -m pyvmm`):
one command run to its end (`pyvmm`), a Python snippet run to its end (`python_probe`), one
left running (`spawn`) and a wait for what it makes (`wait_for_file`), a machine running the
counter guest with a control socket to drive it by (`start_counter`), and a machine waiting
for a migration to come in (`start_destination`)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from guestbuild import ROOT, guest


def pyvmm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=timeout
    )


def python_probe(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`code` run by this Python in a process of its own (`python -c`), from the checkout."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=timeout,
    )  # fmt: skip


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pyvmm", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_file(
    path: Path, proc: subprocess.Popen[str], text: str = "", timeout: float = 120
) -> None:
    """Until `path` exists (a socket, or a file holding `text`), `proc` still running."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and (not text or text in path.read_text(errors="replace"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {text or path}"
        time.sleep(0.1)


def start_counter(control: Path, *options: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", str(guest("counter")), "--control", str(control),
         *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not control.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no control socket"
        time.sleep(0.02)
    return proc


def start_destination(uri: str, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", "--incoming", uri, *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
