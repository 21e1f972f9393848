"""Threads that leave the process's signals to the main thread.

Python runs signal handlers only on the main thread. A signal sent to the process (Ctrl-C's
SIGINT, a SIGTERM) is delivered by the kernel to any thread that does not block it; when that is
a vCPU or device thread, the handler is queued for the main thread, but a main thread blocked in
a wait (`Machine.wait()`) is not woken, and the machine runs on. So every thread pyvmm starts
blocks those signals, as QEMU's threads do. The kick signal stays deliverable: vCPU threads are
kicked out of KVM_RUN with it, and a signal sent to a thread stays with that thread anyway.

The mask is set through libc's pthread_sigmask, not `signal.pthread_sigmask`, which turns the
mask it returns into a set of Signals enums: sixty of them for each thread started, a cost that
shows when a migrated machine starts its threads during the downtime.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from pyvmm.kvm.vcpu import KICK_SIGNAL
from pyvmm.libc import libc

#: Raised by a thread's own fault; blocking them would not keep them from that thread.
_SYNCHRONOUS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP}
MAIN_THREAD_SIGNALS = frozenset(signal.valid_signals() - _SYNCHRONOUS - {KICK_SIGNAL})


class _SigSet(ctypes.Structure):
    """glibc's sigset_t: 1024 bits, signal n at bit n - 1."""

    _fields_ = [("words", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))]

    @classmethod
    def of(cls, signals: frozenset[int]) -> _SigSet:
        sigset, width = cls(), 8 * ctypes.sizeof(ctypes.c_ulong)
        for number in signals:
            sigset.words[(number - 1) // width] |= 1 << ((number - 1) % width)
        return sigset


_MAIN_THREAD_SET = _SigSet.of(MAIN_THREAD_SIGNALS)
_PR_SET_NAME = 15


def _sigmask(how: int, sigset: _SigSet, previous: _SigSet | None) -> None:
    err = libc.pthread_sigmask(how, ctypes.byref(sigset), previous and ctypes.byref(previous))
    if err:
        raise OSError(err, f"pthread_sigmask: {os.strerror(err)}")


def start_thread(target: Callable[..., Any], name: str, *args: Any) -> threading.Thread:
    """Start a daemon thread running `target(*args)` with the main thread's signals blocked,
    named `name` for the kernel too (top -H, perf, /proc/PID/task/*/comm: its first 15 bytes)."""

    def named() -> None:
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
        target(*args)

    thread = threading.Thread(target=named, name=name, daemon=True)
    # A thread inherits its creator's mask: block them here, so none arrives before the target
    # could block them itself.
    previous = _SigSet()
    _sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SET, previous)
    try:
        thread.start()
    finally:
        _sigmask(signal.SIG_SETMASK, previous, None)
    return thread


def idle_priority() -> None:
    """Every thread of this process to SCHED_IDLE: it runs only on CPU time nothing else wants
    (a sliver when there is none: on a CPU kept busy, its exit waits for one to idle). For a
    process whose remaining work is teardown (a migration's source, once its machine runs at
    the destination). Nice 19 was tried instead: in the lab (one CPU) it left one switch-over
    in three with the source's teardown in the guest's gap (2.2 s), SCHED_IDLE none in three."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # (a thread that has just ended)
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
