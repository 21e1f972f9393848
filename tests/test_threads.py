"""pyvmm's threads leave the process's signals to the main thread (pyvmm/machine/threads.py)."""

from __future__ import annotations

import signal

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
