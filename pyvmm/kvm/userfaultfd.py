"""A userfaultfd: the missing pages of registered memory, filled on demand by whoever reads it.

Post-copy migration starts the guest before its RAM has all arrived: RAM is registered here,
every page not yet there faults into this fd (a vCPU's access through KVM too: its thread
waits inside KVM_RUN), and the reader fetches each page and fills it with `copy`, which
wakes the faulting thread. Pages that arrive on their own go in with `copy` as well, since a
page filled any other way would not wake a thread already waiting on it.
"""

from __future__ import annotations

import ctypes
import errno
import os

from pyvmm.kvm.errors import KvmError
from pyvmm.kvm.fd import FdOwner
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.libc import libc
from pyvmm.uapi import userfaultfd as uapi
from pyvmm.uapi.ioctl import IoctlError, ioctl

_SYS_USERFAULTFD = 323  # x86-64
_DEVICE = "/dev/userfaultfd"
_MSG_SIZE = ctypes.sizeof(uapi.uffd_msg)
_NEEDED_IOCTLS = 1 << uapi._UFFDIO_COPY | 1 << uapi._UFFDIO_ZEROPAGE | 1 << uapi._UFFDIO_WAKE


class UserfaultfdUnavailable(KvmError):
    """This kernel or this user cannot have a userfaultfd that serves RAM; the message says
    why and what to do."""


def _open() -> int:
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    fd = libc.syscall(_SYS_USERFAULTFD, flags)
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        raise UserfaultfdUnavailable("this kernel has no userfaultfd (CONFIG_USERFAULTFD)")
    try:  # without CAP_SYS_PTRACE and vm.unprivileged_userfaultfd=0, the device still serves
        device = os.open(_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UserfaultfdUnavailable(
            f"userfaultfd refused ({os.strerror(err)}) and {_DEVICE} cannot be opened "
            f"({exc.strerror}): run as root, give this user {_DEVICE}, or set "
            "vm.unprivileged_userfaultfd=1"
        ) from None
    try:
        return ioctl(device, uapi.USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(device)


class UserFaultFd(FdOwner):
    """One userfaultfd, handshaken for missing pages of anonymous memory and shmem (memfd RAM).

    Non-blocking: `faults()` returns what is pending now; wait for the fd to be readable
    (select/poll on `fileno()`) between calls."""

    def __init__(self) -> None:
        self.fd = _open()
        try:
            api = uapi.uffdio_api(api=uapi.UFFD_API, features=uapi.UFFD_FEATURE_MISSING_SHMEM)
            try:
                ioctl(self.fd, uapi.UFFDIO_API, api)
            except IoctlError as err:
                raise UserfaultfdUnavailable(
                    f"this kernel's userfaultfd cannot serve shmem (memfd) RAM: {err}"
                ) from None
        except BaseException:
            os.close(self.fd)
            raise

    def register(self, addr: int, size: int) -> None:
        """Take over the missing pages of [addr, addr + size) (page-aligned, mapped memory)."""
        request = uapi.uffdio_register(
            range=uapi.uffdio_range(addr, size), mode=uapi.UFFDIO_REGISTER_MODE_MISSING
        )
        ioctl(self.fd, uapi.UFFDIO_REGISTER, request)
        if request.ioctls & _NEEDED_IOCTLS != _NEEDED_IOCTLS:
            self.unregister(addr, size)
            raise UserfaultfdUnavailable(
                f"userfaultfd cannot fill the memory at {addr:#x} (ioctls {request.ioctls:#x})"
            )

    def unregister(self, addr: int, size: int) -> None:
        """Give the range back to the kernel: its missing pages are zero-filled on touch again
        (threads still waiting are woken and fault again)."""
        ioctl(self.fd, uapi.UFFDIO_UNREGISTER, uapi.uffdio_range(addr, size))

    def faults(self) -> list[tuple[int, bool]]:
        """The page faults pending now: (page address, whether a write), in the order they
        came; [] if none. Other events are not asked for and do not come."""
        try:
            data = os.read(self.fd, _MSG_SIZE * 64)
        except BlockingIOError:
            return []
        found = []
        for at in range(0, len(data) - _MSG_SIZE + 1, _MSG_SIZE):
            msg = uapi.uffd_msg.from_buffer_copy(data, at)
            if msg.event == uapi.UFFD_EVENT_PAGEFAULT:
                fault = msg.arg.pagefault
                write = bool(fault.flags & uapi.UFFD_PAGEFAULT_FLAG_WRITE)
                found.append((fault.address & ~(PAGE_SIZE - 1), write))
        return found

    def copy(self, addr: int, data: bytes | bytearray | memoryview) -> bool:
        """Fill the missing pages at `addr` with `data` (whole pages) and wake their waiters.
        False if some page there was not missing (filled already, which is no error for a
        page that two paths deliver): that page keeps what it has, the others are filled."""
        buffer = ctypes.c_char * len(data)
        if isinstance(data, bytes) or memoryview(data).readonly:
            source = buffer.from_buffer_copy(data)
        else:  # (no copy: a migration section's own buffer)
            source = buffer.from_buffer(data)
        request = uapi.uffdio_copy(dst=addr, src=ctypes.addressof(source), len=len(data))
        return self._fill(uapi.UFFDIO_COPY, request, len(data))

    def zero(self, addr: int, size: int) -> bool:
        """Fill the missing pages at `addr` with zeros and wake their waiters; False as for
        `copy`."""
        request = uapi.uffdio_zeropage(range=uapi.uffdio_range(addr, size))
        return self._fill(uapi.UFFDIO_ZEROPAGE, request, size)

    def _fill(
        self, number: int, request: uapi.uffdio_copy | uapi.uffdio_zeropage, size: int
    ) -> bool:
        """Issue a fill until the whole range is done: the kernel may stop part way (EAGAIN,
        the mappings changing) or at a page that is there already (EEXIST), saying how far it
        got; the rest is asked for again, past that page."""
        every_page = True
        while True:
            try:
                ioctl(self.fd, number, request)
                return every_page
            except IoctlError as err:
                if err.errno not in (errno.EAGAIN, errno.EEXIST):
                    raise
                if isinstance(request, uapi.uffdio_copy):
                    done = max(request.copy, 0)
                else:
                    done = max(request.zeropage, 0)
                if err.errno == errno.EEXIST:
                    every_page = False
                    done += PAGE_SIZE
            size -= done
            if size <= 0:
                return every_page
            if isinstance(request, uapi.uffdio_copy):
                request.dst, request.src, request.len = request.dst + done, request.src + done, size
                request.copy = 0
            else:
                request.range.start, request.range.len = request.range.start + done, size
                request.zeropage = 0
