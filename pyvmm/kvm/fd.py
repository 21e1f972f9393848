"""The base of pyvmm's kernel objects: each is held by one fd, closed once."""

from __future__ import annotations

import os
from typing import Self


class FdOwner:
    """A kernel object held by its fd (`fd`, -1 once closed): `close()` it, or use it as a
    context manager. A subclass whose object needs more on the way out overrides `close()` and
    ends with `super().close()`."""

    fd: int = -1

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
