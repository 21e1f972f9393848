"""A virtio device's worker thread: it polls the device's queue doorbells, a wake-up eventfd and
whatever else the device watches (a tap), and has the device serve what is ready, never on a
vCPU thread. Pausing parks it between two rounds of serving (pyvmm.devices.virtio.pci says what
that promises); closing stops it.
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable, Sequence

from pyvmm.kvm.eventfd import EventFd
from pyvmm.machine.threads import start_thread

log = logging.getLogger(__name__)


class QueueWorker:
    """The worker thread of device `name` (the thread is `name`-worker). Each round it asks
    `watch()` which further fds to poll besides the `doorbells` (fd -> what the device makes
    of it), polls them all, and hands the ready ones to `serve`, with that answer of
    `watch()`. An exception out of either is a pyvmm bug: it is logged and handed to
    `failed`, and the worker goes on. The callbacks take whatever lock the device needs."""

    def __init__(
        self,
        name: str,
        doorbells: Sequence[int],
        *,
        watch: Callable[[], dict[int, int]],
        serve: Callable[[list[int], dict[int, int]], None],
        failed: Callable[[Exception], None],
    ) -> None:
        self.name = name
        self._doorbells = tuple(doorbells)
        self._watch = watch
        self._serve = serve
        self._failed = failed
        self._wake = EventFd()
        self._park = threading.Condition()
        self._pausing = False
        self._parked = False
        self._stopping = False
        try:
            self._thread = start_thread(self._work, f"{name}-worker")
        except BaseException:
            self._wake.close()
            raise

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _work(self) -> None:
        poller = select.poll()
        for fd in (self._wake.fd, *self._doorbells):
            poller.register(fd, select.POLLIN)
        watched: set[int] = set()
        while True:
            try:
                wanted = self._watch()
                for fd in watched - wanted.keys():
                    poller.unregister(fd)
                for fd in wanted.keys() - watched:
                    poller.register(fd, select.POLLIN)
                watched = set(wanted)
                ready = [fd for fd, _ in poller.poll()]
                if self._wake.fd in ready:
                    self._wake.read()
                    if not self._park_while_paused():
                        return
                    continue  # poll again: what is ready was not taken
                self._serve(ready, wanted)
            except Exception as err:  # a pyvmm bug: the device stops, the worker does not
                log.exception("%s: worker failed", self.name)
                self._failed(err)

    def _park_while_paused(self) -> bool:
        """Wait here, between requests, while paused; False when the worker is to stop."""
        with self._park:
            while self._pausing and not self._stopping:
                self._parked = True
                self._park.notify_all()
                self._park.wait()
            self._parked = False
            return not self._stopping

    def pause(self) -> None:
        """Return once the worker is parked between two rounds (or a resume() came first)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError(f"{self.name}: pause() on its own worker would wait for itself")
        with self._park:
            self._pausing = True
        self._wake.signal()
        with self._park:
            while self._pausing and not self._parked and self.is_alive():
                self._park.wait(0.1)

    def resume(self) -> None:
        with self._park:
            self._pausing = False
            self._park.notify_all()

    def close(self) -> None:
        """Stop the worker and wait for it."""
        if self.is_alive():
            with self._park:
                self._stopping = True
                self._park.notify_all()
            self._wake.signal()
            self._thread.join()
        self._wake.close()
