"""A Linux guest moved around in the lab: the lab kernel under pyvmm, with virtio-blk,
virtio-rng and virtio-net on a tap, runs a loop that prints a tick and writes it to its disk;
it is snapshotted and stopped, restored (by mmap), live-migrated over a unix socket, then over
tcp loopback, then with post-copy (its vCPUs' faults, through the lab's nested KVM, and its
virtio devices' accesses, through pyvmm's, wait for pages still at the source), and quit. Every
process prints into one console file (each inherits its predecessor's), whose ticks must run
1, 2, 3, ... with none lost or repeated, and the disk must hold the last tick printed (give or
take the one the quit cut short). In a lab session of its own ("linux-migrate")."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from linuxkernel import lab_kernel
from processes import spawn, wait_for_file

from pyvmm.initramfs import BUSYBOX_INIT_PRELUDE, busybox_initramfs
from pyvmm.lab.launcher import find_busybox

MARK = "pyvmm-guest:"
TAP = "pyvmmmig0"
INIT = rf"""{BUSYBOX_INIT_PRELUDE}ip link set eth0 up
echo "{MARK} rng $(cat /sys/class/misc/hw_random/rng_current)"
i=0
while true; do
  i=$((i + 1))
  echo "{MARK} tick $i"
  printf '%08d\n' $i | dd of=/dev/vda bs=512 count=1 conv=sync,notrunc,fsync 2>/dev/null
  usleep 100000
done
"""
TICK = re.compile(rf"^{MARK} tick (\d+)\r?\n", re.MULTILINE)


def ticks(console: Path) -> list[int]:
    return [int(n) for n in TICK.findall(console.read_text(errors="replace"))]


def wait_for_more_ticks(
    console: Path, more: int, machine: subprocess.Popen[str], timeout: float = 120
) -> int:
    """Wait until the console has `more` ticks beyond what it has now; the last tick then.
    A guest that stops ticking fails the test with the console's tail and what its pyvmm
    (`machine`) says when stopped by SIGINT: where each vCPU was (the evidence of a hang)."""
    start = len(ticks(console))
    deadline = time.monotonic() + timeout
    while len(ticks(console)) < start + more:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{console.read_text(errors='replace')[-3000:]}\n{stopped_report(machine)}"
            )
        time.sleep(0.1)
    return ticks(console)[-1]


def stopped_report(machine: subprocess.Popen[str]) -> str:
    """What the pyvmm running the guest says once stopped by SIGINT (its vCPUs' places)."""
    if machine.poll() is None:
        machine.send_signal(signal.SIGINT)
    try:
        _, err = machine.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        machine.kill()
        _, err = machine.communicate()
    return f"its pyvmm ended with exit {machine.returncode}:\n{err[-4000:]}"


def pyvmm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # the lab's init leaves it down
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


PRE_COPY = ("--downtime", "300", "--auto-converge")
POST_COPY = ("--downtime", "1", "--postcopy")
POST_COPY_TRIES = 3


def migrate(
    source: subprocess.Popen[str],
    control: Path,
    uri: str,
    new_control: Path,
    options: tuple[str, ...] = PRE_COPY,
) -> tuple[subprocess.Popen[str], str]:
    """Migrate the machine at `control` to a new process at `uri`; the new process and what
    `pyvmm migrate` said. Pre-copy's downtime limit is QEMU's default; the lab (TCG) copies
    memory at a few MB/s, about as fast as the ticking guest dirties it, so the migration
    throttles it (auto-converge). Post-copy's 1 ms seldom fits: it switches (the caller
    migrates again when it did not)."""
    destination = spawn("run", "--incoming", uri, "--control", str(new_control))
    # (its control socket comes just before it listens: a Python starting in the lab's TCG
    # can take longer than the source's connect waits)
    wait_for_file(new_control, destination)
    moved = pyvmm("migrate", str(control), uri, *options)
    if moved.returncode != 0:
        source.kill()
        destination.kill()
        raise AssertionError(
            f"{moved.stderr}\nsource: {source.communicate()[1]}\n"
            f"destination: {destination.communicate()[1]}"
        )
    print(moved.stdout.strip())
    wait_for_file(new_control, destination)
    return destination, moved.stdout


def finished(proc: subprocess.Popen[str], reason: str) -> None:
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and reason in err, err


@pytest.mark.lab(session="linux-migrate")
def test_a_linux_guest_is_snapshotted_restored_and_migrated_three_times_losing_nothing(
    tmp_path: Path,
) -> None:
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(find_busybox(), INIT))
    disk, console = tmp_path / "disk.img", tmp_path / "console.txt"
    disk.write_bytes(bytes(1 << 20))
    controls = [tmp_path / f"vm{n}.sock" for n in range(4 + POST_COPY_TRIES)]
    first = spawn(
        "run", "-k", str(lab_kernel()), "-i", str(initrd), "-m", "256M", "-c", "2",
        "-p", "console=ttyS0 quiet panic=-1", "--disk", str(disk), "--rng", "--net", f"tap:{TAP}",
        "--console", f"file:{console}", "--control", str(controls[0]),
    )  # fmt: skip
    running: list[subprocess.Popen[str]] = [first]
    try:
        wait_for_file(controls[0], first)
        wait_for_more_ticks(console, 5, first)
        snap = tmp_path / "snap"
        taken = pyvmm("snapshot", str(controls[0]), str(snap), "--stop")
        assert taken.returncode == 0, taken.stderr
        print(taken.stdout.strip())
        finished(first, "snapshotted to")

        restored = spawn("restore", str(snap), "--control", str(controls[1]))
        running.append(restored)
        wait_for_file(controls[1], restored)
        wait_for_more_ticks(console, 5, restored)

        by_unix, _ = migrate(restored, controls[1], f"unix:{tmp_path / 'in.sock'}", controls[2])
        running.append(by_unix)
        finished(restored, "migrated to unix:")
        wait_for_more_ticks(console, 5, by_unix)

        by_tcp, _ = migrate(by_unix, controls[2], f"tcp:127.0.0.1:{free_port()}", controls[3])
        running.append(by_tcp)
        finished(by_unix, "migrated to tcp:")
        wait_for_more_ticks(console, 5, by_tcp)

        # Post-copy: a round can find the guest idle between two ticks, its few dirty pages
        # within even a 1 ms limit, and then the migration rightly ends by pre-copy; so it
        # migrates on (at most POST_COPY_TRIES times) until one has switched.
        source, control, said = by_tcp, controls[3], ""
        for attempt in range(POST_COPY_TRIES):
            uri, next_control = f"unix:{tmp_path / f'post{attempt}.sock'}", controls[4 + attempt]
            by_postcopy, said = migrate(source, control, uri, next_control, POST_COPY)
            running.append(by_postcopy)
            finished(source, "migrated to unix:")
            wait_for_more_ticks(console, 5, by_postcopy)
            source, control = by_postcopy, next_control
            if "; post-copy: " in said:
                break
        assert "; post-copy: " in said, said

        assert pyvmm("ctl", str(control), "quit").returncode == 0
        finished(source, "quit from the control socket")
    finally:
        for proc in running:
            proc.kill()
    seen = ticks(console)
    assert seen == list(range(1, len(seen) + 1)), seen
    assert "virtio_rng" in console.read_text(errors="replace")
    on_disk = int(disk.read_bytes()[:8])
    # The quit may fall between a tick's echo and its write to the disk (the disk is a tick
    # behind), or after both but before the serial driver had sent the echoed line out (a tick
    # ahead: echo returns once the line is in the guest's tty buffer).
    assert on_disk in (seen[-1] - 1, seen[-1], seen[-1] + 1), (on_disk, seen[-1])
