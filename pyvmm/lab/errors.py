"""The lab's failures that a user sees as one line, without a traceback."""

from __future__ import annotations


class LabError(Exception):
    """The lab could not do what was asked; the message says why in one line."""


class LabUnavailable(LabError):
    """Something the lab needs is missing on this host (QEMU, busybox, a kernel).

    The lab test tier turns this into a skip rather than a failure.
    """


class LabTimeout(LabError):
    """The command inside the lab did not finish in time (or went silent); QEMU was stopped.

    `evidence` is what QEMU's monitor showed of the lab's CPUs before that (see
    `pyvmm.lab.monitor`); the message has its one-line summary.
    """

    def __init__(self, message: str, evidence: str = "") -> None:
        super().__init__(message)
        self.evidence = evidence


class LabCrashed(LabError):
    """QEMU itself died of a signal (an assertion or a fault in the emulator), not the guest.

    The lab test tier boots once more for the tests left without a result.
    """


class LabReset(LabError):
    """The lab machine reset itself before the command finished (QEMU, run with -no-reboot,
    exited 0) with no panic and no init failure on its console: a triple fault of the lab
    kernel, as TCG's nested virtualization now and then causes. The lab test tier boots once
    more for the tests left without a result, as for a crash.
    """
