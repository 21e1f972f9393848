"""The lab kernel's log, read from /dev/kmsg: what it logged while a test or a soak's boot ran
(an IOMMU fault, a stalled vCPU, an oops), which explains a failure as often as the test's own
output does."""

from __future__ import annotations

import os


class KernelLog:
    """The kernel's log records since a point, read from /dev/kmsg (each read returns one
    record; EAGAIN once all are read; EPIPE when the ring overwrote unread ones)."""

    _MAX_LINES = 200

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            self.fd = None

    def skip_to_end(self) -> None:
        if self.fd is not None:
            os.lseek(self.fd, 0, os.SEEK_END)

    def read_new(self) -> str:
        if self.fd is None:
            return "(/dev/kmsg cannot be read)"
        lines: list[str] = []
        while True:
            try:
                record = os.read(self.fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except BrokenPipeError:
                lines.append("(some records were overwritten before they were read)")
                continue
            prefix, _, message = record.partition(";")
            fields = prefix.split(",")
            seconds = int(fields[2]) / 1e6 if len(fields) > 2 and fields[2].isdigit() else 0.0
            lines.append(f"[{seconds:12.6f}] {message.splitlines()[0] if message else ''}")
        dropped = len(lines) - self._MAX_LINES
        kept = lines[-self._MAX_LINES :]
        head = [f"({dropped} earlier lines left out)"] if dropped > 0 else []
        return "\n".join(head + kept) if kept else "(nothing)"
