"""Threads that leave the process's signals to the main thread.

Python runs signal handlers only on the main thread. A signal sent to the process (Ctrl-C's
SIGINT, a SIGTERM) is delivered by the kernel to any thread that does not block it; when that is
a vCPU or device thread, the handler is queued for the main thread, but a main thread blocked in
a wait (`Machine.wait()`) is not woken, and the machine runs on. So every thread pyvmm starts
blocks those signals, as QEMU's threads do. The kick signal stays deliverable: vCPU threads are
kicked out of KVM_RUN with it, and a signal sent to a thread stays with that thread anyway.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

from pyvmm.kvm.vcpu import KICK_SIGNAL

#: Raised by a thread's own fault; blocking them would not keep them from that thread.
_SYNCHRONOUS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP}
MAIN_THREAD_SIGNALS = frozenset(signal.valid_signals() - _SYNCHRONOUS - {KICK_SIGNAL})


def start_thread(target: Callable[..., Any], name: str, *args: Any) -> threading.Thread:
    """Start a daemon thread running `target(*args)` with the main thread's signals blocked."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    # A thread inherits its creator's mask: block them here, so none arrives before the target
    # could block them itself.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread
