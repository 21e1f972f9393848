"""pyvmm's threads leave the process's signals to the main thread (pyvmm/machine/threads.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

from pyvmm.kvm.vcpu import KICK_SIGNAL
from pyvmm.machine.threads import MAIN_THREAD_SIGNALS, start_thread

UNBLOCKABLE = {signal.SIGKILL, signal.SIGSTOP}


def test_a_started_thread_blocks_the_main_threads_signals_and_the_caller_keeps_its_mask() -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    seen: list[set[int]] = []
    thread = start_thread(lambda: seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])), "t")
    thread.join(10)
    assert seen[0] == MAIN_THREAD_SIGNALS - UNBLOCKABLE
    assert signal.SIGINT in seen[0] and signal.SIGTERM in seen[0]
    assert KICK_SIGNAL not in seen[0] and signal.SIGSEGV not in seen[0]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_a_started_thread_carries_its_name_to_the_kernel() -> None:
    """So that top -H, perf and a lab trace tell a vCPU from the control thread."""
    seen: list[str] = []

    def read_own_name() -> None:
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text())

    start_thread(read_own_name, "vcpu3-of-a-long-name").join()
    assert seen == ["vcpu3-of-a-long\n"]  # (the kernel keeps 15 bytes)


def test_idle_priority_puts_every_thread_of_the_process_on_idle_time() -> None:
    """What a migration's source does once its machine runs elsewhere (pyvmm run's teardown
    then takes only CPU nobody else wants): checked in a process of its own."""
    probe = (
        "import os, threading\n"
        "from pyvmm.machine.threads import idle_priority, start_thread\n"
        "go = threading.Event()\n"
        "worker = start_thread(go.wait, 'worker')\n"
        "idle_priority()\n"
        "tids = os.listdir('/proc/self/task')\n"
        "print(all(os.sched_getscheduler(int(t)) == os.SCHED_IDLE for t in tids), len(tids))\n"
        "go.set()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["True", "2"], done.stderr
