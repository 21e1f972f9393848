"""eventfd(2) objects, the currency of irqfd, resamplefd and ioeventfd."""

from __future__ import annotations

import os

from pyvmm.kvm.fd import FdOwner


class EventFd(FdOwner):
    """A non-blocking eventfd counter."""

    def __init__(self, initval: int = 0, *, nonblocking: bool = True) -> None:
        flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking else 0)
        self.fd = os.eventfd(initval, flags)

    def signal(self, value: int = 1) -> None:
        os.eventfd_write(self.fd, value)

    def read(self) -> int:
        """Return and reset the counter; 0 if it was not signalled."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0
