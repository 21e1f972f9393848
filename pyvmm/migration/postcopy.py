"""Post-copy migration: the destination runs before all of its RAM has arrived.

A guest that dirties memory faster than it can be sent never fits a pre-copy's downtime limit.
With post-copy it need not: once pre-copy rounds stop paying, the source pauses and sends its
state and which pages the destination's copy lacks (those dirtied since they were sent); the
destination restores the state, drops those pages, registers its RAM with a userfaultfd, and
runs at once. (Not before the restore: restoring a vCPU's kvmclock MSRs makes KVM map or write
their pages, and nothing serves a fault before the machine runs.) A page the
guest touches that is not there yet faults: a vCPU waits inside KVM_RUN, a pyvmm thread in
`GuestMemory.before_access`; the destination asks the source for it, and the source sends it
ahead of its push of the rest, which then goes on from there (a guest's next touches are often
near its last). When every page is in, the destination says so and the source ends.

    source                                      destination
    ... pre-copy rounds, COMPONENT*
    POSTCOPY: the pages the destination lacks   ->  restores, drops them, registers its RAM, runs
                                         <-     {"resumed": true, "postcopy": true, ...}
    PAGES / PAGE_RUNS / ZERO_PAGES (pushed)  ->    filled with UFFDIO_COPY / UFFDIO_ZEROPAGE
                                         <-     {"pages": [[gpa, count], ...]} (faults)
                                         <-     {"awaiting": pages} (every 10 s: still there)
    END                                  ->
                                         <-     {"complete": true}

The price: from the switch on, the machine exists in two halves. A lost connection, or either
side dying, before "complete" loses the VM: the destination stops with an error rather than run
on pages it does not have, and the source stays paused (its copy is older than what the
destination has run). QEMU's post-copy makes the same trade.

This module holds each side's bookkeeping; postcopy_link.py drives the stream.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import struct
import threading
from collections.abc import Callable, Iterator

from pyvmm.kvm.mmap import PAGE_SIZE, remove_pages
from pyvmm.kvm.userfaultfd import UserFaultFd
from pyvmm.machine.dirty import DirtyBitmap
from pyvmm.machine.memory import GuestMemory, GuestMemoryError, RamRegion
from pyvmm.machine.threads import start_thread

_REGION = struct.Struct("<QQ")  # a POSTCOPY entry: a region's address and pages; its bitmap next
MAX_REQUEST_RUNS = 64  # runs per {"pages": ...} request
# A destination page is one of these (one byte each: 0.025% of RAM):
_HERE = 0  # here already, or a zero page nobody sent (a hole: filled with zeros when touched)
_AWAITED = 1  # dropped at the switch: its contents are still at the source
_FILLED = 2  # filled since the switch (or known to be here)


class PostcopyError(Exception):
    """What went wrong in post-copy, in words for the user."""


def encode_pending(bitmaps: list[DirtyBitmap]) -> bytes:
    """A POSTCOPY section's payload: for each RAM region, its address and number of pages,
    then a bitmap of the pages the destination lacks (KVM's layout: bit i is page i; the
    spare bits of its last byte are zeros)."""
    return b"".join(_REGION.pack(b.gpa, b.pages) + b.bitmap for b in bitmaps)


def decode_pending(payload: bytes, memory: GuestMemory) -> dict[int, bytes]:
    """The pending bitmaps of a POSTCOPY payload by region address; PostcopyError unless each
    names a RAM region of `memory` once, with its size."""
    regions = {region.gpa: region for region in memory.regions}
    pending: dict[int, bytes] = {}
    at = 0
    while at < len(payload):
        if at + _REGION.size > len(payload):
            raise PostcopyError("its last entry is cut short")
        gpa, pages = _REGION.unpack_from(payload, at)
        region = regions.get(gpa)
        if region is None or pages != region.size // PAGE_SIZE or gpa in pending:
            raise PostcopyError(f"names no RAM region of this machine ({gpa:#x}, {pages} pages)")
        at += _REGION.size
        bitmap = payload[at : at + (pages + 7) // 8]
        if len(bitmap) != (pages + 7) // 8:
            raise PostcopyError("its last bitmap is cut short")
        if pages % 8 and bitmap[-1] >> (pages % 8):
            raise PostcopyError(f"its bitmap for {gpa:#x} marks pages past the region's end")
        pending[gpa] = bitmap
        at += len(bitmap)
    return pending


_RUN_OF = {value: re.compile(re.escape(bytes([value])) + b"+") for value in (0, 1, 2)}


def _runs(states: bytearray, value: int, first: int, last: int) -> Iterator[tuple[int, int]]:
    """(start, end) page indices of each run of `value` in states[first:last] (found in C)."""
    for match in _RUN_OF[value].finditer(states, first, last):
        yield match.start(), match.end()


def _page_runs(bitmap: DirtyBitmap) -> Iterator[tuple[int, int]]:
    """(index of its first page, pages) of each run of pages `bitmap` marks."""
    for gpa, size in bitmap.ranges():
        yield (gpa - bitmap.gpa) // PAGE_SIZE, size // PAGE_SIZE


# the destination


class Destination:
    """An incoming machine's RAM while post-copy brings its missing pages in.

    Made before the machine first runs: drops the pages `pending` names and registers all of
    RAM with a userfaultfd; `start()` serves its faults on a thread of its own, which asks the
    source for what is missing with `send({"pages": [[gpa, pages], ...]})`, and tells it every
    KEEPALIVE seconds that it is still waiting (`{"awaiting": pages}`: a source that hears
    nothing for long takes the destination for gone). The stream's reader hands in what
    arrives (`fill`, `fill_zeros`) and says when the stream ended (`complete`) or broke
    (`fail`)."""

    KEEPALIVE = 10.0

    def __init__(
        self,
        memory: GuestMemory,
        pending: dict[int, bytes],
        send: Callable[[dict[str, object]], None],
        on_failure: Callable[[str], None],
    ) -> None:
        self.memory = memory
        self._send = send
        self._on_failure = on_failure
        self._states: dict[int, bytearray] = {}
        self._asked: dict[int, bytearray] = {}  # pages asked for already (one byte each)
        self._cond = threading.Condition()
        self.awaited = 0  # pages still to come
        self.requested_pages = 0  # pages asked for by a fault or an access
        self.failure = ""
        self._done = threading.Event()
        self._server: threading.Thread | None = None
        self.uffd = UserFaultFd()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            for region in memory.regions:
                self._states[region.gpa] = self._drop(region, pending.get(region.gpa))
                self._asked[region.gpa] = bytearray(region.size // PAGE_SIZE)
                self.uffd.register(region.host_addr, region.size)
        except BaseException:
            self._close_fds()
            raise
        memory.before_access = self.ensure
        memory.missing = "a post-copy migration is still bringing its RAM in"

    def _drop(self, region: RamRegion, bitmap: bytes | None) -> bytearray:
        states = bytearray(region.size // PAGE_SIZE)
        if bitmap:
            marked = DirtyBitmap(region.gpa, len(states), bitmap, bytes(len(bitmap)))
            for first, count in _page_runs(marked):
                states[first : first + count] = bytes([_AWAITED]) * count
                remove_pages(region.host_addr + first * PAGE_SIZE, count * PAGE_SIZE)
                self.awaited += count
        return states

    def start(self) -> None:
        self._server = start_thread(self._serve_faults, "postcopy-faults")

    # what arrives

    def fill(self, writes: list[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Pages the source sent, a section's (gpa, bytes) writes: the awaited ones among them
        go in, and whoever waits on them wakes; any other page keeps what it has."""
        self._fill([(gpa, len(data), data) for gpa, data in writes])

    def fill_zeros(self, gpa: int, size: int) -> None:
        self._fill([(gpa, size, None)])

    def _fill(self, runs: list[tuple[int, int, bytes | bytearray | memoryview | None]]) -> None:
        """(gpa, size, bytes, or None for zeros) runs. A guest's last pages are scattered, a
        page or a few a run, and a section brings dozens of runs: so the waiters are woken
        once a section (each page is marked as it goes in: only this thread marks awaited
        pages filled, and a page that comes twice is taken once)."""
        filled = 0
        try:
            for gpa, size, data in runs:
                region, states, first, last = self._place(gpa, size)
                if last - first == 1:  # (most runs: no search)
                    awaited = [(first, last)] if states[first] == _AWAITED else []
                else:
                    awaited = list(_runs(states, _AWAITED, first, last))
                for start, end in awaited:
                    address = region.host_addr + start * PAGE_SIZE
                    if data is None:
                        done = self.uffd.zero(address, (end - start) * PAGE_SIZE)
                    else:
                        piece = data[(start - first) * PAGE_SIZE : (end - first) * PAGE_SIZE]
                        done = self.uffd.copy(address, piece)
                    if not done:
                        raise PostcopyError(self._there_already(region, start, end))
                    states[start:end] = bytes([_FILLED]) * (end - start)
                    filled += end - start
        finally:
            if filled:
                with self._cond:
                    self.awaited -= filled
                    self._cond.notify_all()

    @staticmethod
    def _there_already(region: RamRegion, start: int, end: int) -> str:
        return (
            f"a page at {region.gpa + start * PAGE_SIZE:#x}+{(end - start) * PAGE_SIZE:#x} that "
            "was dropped at the switch was there again (not the source's)"
        )

    def complete(self) -> None:
        """The stream ended: every page must be in; then RAM is the kernel's again."""
        if self.awaited:
            raise PostcopyError(f"the source ended with {self.awaited} pages not sent")
        self.memory.before_access = None
        self.memory.missing = ""
        for region in self.memory.regions:
            self.uffd.unregister(region.host_addr, region.size)
        self._stop_serving()

    def fail(self, why: str) -> None:
        """The source is gone with pages not sent: the machine cannot go on (`on_failure`
        stops it); then the userfaultfd is closed, which lets the threads waiting on it go."""
        with self._cond:
            if self.failure:
                return
            self.failure = why
            self._cond.notify_all()
        self._on_failure(why)
        self._stop_serving()

    def close(self) -> None:
        """The machine is closing: no more waiting for pages (a reader still waiting raises),
        nor filling them."""
        with self._cond:
            if not self.failure:
                self.failure = "the machine closed"
            self._cond.notify_all()
        self._stop_serving()

    def _stop_serving(self) -> None:
        """End the fault server, which closes the fds on its way out (or close them now if it
        never started): never while it may still be waiting on them."""
        self._done.set()
        if self._server is None:
            self._close_fds()
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._server is not threading.current_thread():
            self._server.join()

    # faults and accesses

    def ensure(self, gpa: int, length: int) -> None:
        """Make RAM at gpa..gpa+length present before a pyvmm thread touches it: holes are
        filled with zeros, awaited pages are asked for and waited on (without the GIL)."""
        region, states, first, last = self._place(gpa, length)
        if states.count(_FILLED, first, last) == last - first:
            return
        try:
            if self.failure:
                raise OSError(self.failure)
            for start, end in _runs(states, _HERE, first, last):
                self.uffd.zero(region.host_addr + start * PAGE_SIZE, (end - start) * PAGE_SIZE)
                states[start:end] = bytes([_FILLED]) * (end - start)
            if states.find(_AWAITED, first, last) < 0:
                return
            self._ask(region, states, first, last)
        except OSError as err:
            raise GuestMemoryError(f"guest RAM at {gpa:#x} cannot come in: {err}") from None
        with self._cond:
            while states.find(_AWAITED, first, last) >= 0:
                if self.failure:
                    raise GuestMemoryError(f"guest RAM at {gpa:#x} never came: {self.failure}")
                self._cond.wait(1.0)

    def _serve_faults(self) -> None:
        try:
            while not self._done.is_set():
                readable, _, _ = select.select([self.uffd.fd, self._wake_r], [], [], self.KEEPALIVE)
                if self._wake_r in readable:
                    return
                if not readable:
                    self._send({"awaiting": self.awaited})
                for address, _write in self.uffd.faults():
                    self._on_fault(address)
        except (OSError, GuestMemoryError) as err:
            if not self._done.is_set():
                self.fail(f"serving page faults failed: {err}")
        finally:
            self._close_fds()  # (which wakes whoever still waits on a fault)

    def _on_fault(self, address: int) -> None:
        region = self._region_at(address)
        page = (address - region.host_addr) // PAGE_SIZE
        states = self._states[region.gpa]
        if states[page] == _HERE:  # a hole: a page of zeros no one sent
            self.uffd.zero(address, PAGE_SIZE)
            states[page] = _FILLED
        elif states[page] == _AWAITED:
            self._ask(region, states, page, page + 1)
        # _FILLED: it came after the fault was queued, and its fill woke the vCPU

    def _ask(self, region: RamRegion, states: bytearray, first: int, last: int) -> None:
        """Ask the source for the awaited pages of first..last not asked for before."""
        asked = self._asked[region.gpa]
        runs = []
        for start, end in _runs(states, _AWAITED, first, last):
            for lo, hi in _runs(asked, 0, start, end):
                asked[lo:hi] = b"\x01" * (hi - lo)
                runs.append([region.gpa + lo * PAGE_SIZE, hi - lo])
                self.requested_pages += hi - lo
        for at in range(0, len(runs), MAX_REQUEST_RUNS):
            self._send({"pages": runs[at : at + MAX_REQUEST_RUNS]})

    def _place(self, gpa: int, length: int) -> tuple[RamRegion, bytearray, int, int]:
        region = self.memory.region_for(gpa, max(length, 1))
        first = (gpa - region.gpa) // PAGE_SIZE
        last = (gpa + length - region.gpa + PAGE_SIZE - 1) // PAGE_SIZE
        return region, self._states[region.gpa], first, last

    def _region_at(self, address: int) -> RamRegion:
        for region in self.memory.regions:
            if region.host_addr <= address < region.host_addr + region.size:
                return region
        raise GuestMemoryError(f"a page fault at {address:#x}, outside guest RAM")

    def _close_fds(self) -> None:
        self.uffd.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


# the source


class Pending:
    """The source's list of pages still to send after the switch: pushed in address order from
    a cursor, which a request moves (the guest's next faults are likely near its last)."""

    def __init__(self, bitmaps: list[DirtyBitmap]) -> None:
        self._todo: list[tuple[int, bytearray]] = []
        self.left = 0
        for bitmap in sorted(bitmaps, key=lambda b: b.gpa):
            todo = bytearray(bitmap.pages)
            for first, count in _page_runs(bitmap):
                todo[first : first + count] = b"\x01" * count
                self.left += count
            self._todo.append((bitmap.gpa, todo))
        self._cursor = (0, 0)  # (region index, page)

    def take_requested(self, gpa: int, pages: int) -> list[tuple[int, int]]:
        """The unsent runs (gpa, size) within a request, marked sent; the push goes on after."""
        for index, (base, todo) in enumerate(self._todo):
            first = (gpa - base) // PAGE_SIZE
            if 0 <= first < len(todo):
                last = min(first + pages, len(todo))
                runs = list(self._take(index, first, last))
                self._cursor = (index, last)
                return runs
        return []

    def take_next(self, max_pages: int) -> tuple[int, int] | None:
        """The next unsent run from the cursor (at most `max_pages`), marked sent; None once
        all is sent. It wraps around: a request may have moved the cursor past pages."""
        if not self.left:
            return None
        index, page = self._cursor
        for step in range(len(self._todo) + 1):
            region = (index + step) % len(self._todo)
            todo = self._todo[region][1]
            start = todo.find(1, page if step == 0 else 0)
            if start >= 0:
                end = todo.find(0, start, start + max_pages)
                end = min(start + max_pages, len(todo)) if end < 0 else end
                self._cursor = (region, end)
                (run,) = self._take(region, start, end)
                return run
        return None

    def take_batch(self, max_pages: int) -> list[tuple[int, int]]:
        """The next unsent runs from the cursor, at most `max_pages` in all, marked sent; an
        empty list once all is sent."""
        runs: list[tuple[int, int]] = []
        while max_pages > 0 and (run := self.take_next(max_pages)) is not None:
            runs.append(run)
            max_pages -= run[1] // PAGE_SIZE
        return runs

    def _take(self, region: int, first: int, last: int) -> Iterator[tuple[int, int]]:
        base, todo = self._todo[region]
        for start, end in _runs(todo, 1, first, last):
            todo[start:end] = bytes(end - start)
            self.left -= end - start
            yield base + start * PAGE_SIZE, (end - start) * PAGE_SIZE
