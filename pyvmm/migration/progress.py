"""What a live migration reports of itself: its progress (`migrate-status`, progress bars) and
where its downtime went."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Progress:
    """Where a migration is, for `migrate-status` and progress bars."""

    status: str = "setup"  # setup, active, completing, postcopy, completed, failed
    round: int = 0
    ram_bytes: int = 0
    sent_bytes: int = 0  # bytes of the stream sent so far, all rounds
    dirty_bytes: int = 0  # what the last round found dirty
    bandwidth: float = 0.0  # bytes per second, last round
    throttle_percent: int = 0  # the vCPU throttle auto-converge reached (it ends with it)
    postcopy: bool = False  # switched to post-copy: the destination runs, pages still to come
    postcopy_pages: int = 0  # pages the destination lacked when it started
    postcopy_requested_pages: int = 0  # of those, pages its faults asked for ahead of the push
    postcopy_ms: float = 0.0  # from the destination's start until it had every page
    downtime_ms: float = 0.0  # paused until the destination ran (when completed)
    device_precopy_bytes: int = 0  # devices' state sent ahead of the stop (VFIO PRE_COPY)
    device_state_bytes: int = 0  # devices' state read at the stop (VFIO STOP_COPY)
    switchover_acked: bool = False  # the destination loaded that state's start (acknowledged)
    switchover_ack_ms: float = 0.0  # waited for its acknowledgement
    # where the downtime went: pausing, the last pages, saving and sending the state, and the
    # destination restoring and starting it (until its answer came)
    downtime_phases_ms: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""
    rounds: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def round_done(self, seconds: float, sent: int) -> None:
        """A round of pages ended: `sent` bytes went on the wire in `seconds` (so that the
        bandwidth is the link's, not how fast zero chunks are skipped)."""
        seconds = max(seconds, 1e-6)
        if sent:
            self.bandwidth = sent / seconds
        self.sent_bytes += sent
        self.rounds.append({"bytes": sent, "seconds": seconds})
        self.round += 1


class Phases:
    """Times of consecutive phases, from when it was made."""

    def __init__(self) -> None:
        self._started = self._last = time.monotonic()
        self.ms: dict[str, float] = {}

    def end(self, name: str) -> None:
        now = time.monotonic()
        self.ms[name] = round((now - self._last) * 1000, 3)
        self._last = now

    def split_last(self, parts: object, name: str) -> None:
        """Split phase `name`, the last, by the destination's own account of its end (`parts`:
        its {"restore": ms, "postcopy": ms, "start": ms}, untrusted, ignored unless
        well-formed): what is left before them is `name`_reading (the stream still in transit
        or being read). The destination may have read the end while the source's last write
        was still returning: then its parts are scaled down to fit."""
        total = self.ms.get(name, 0.0)
        if not isinstance(parts, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1e9
            for v in parts.values()
        ):
            return
        known = {k: float(parts[k]) for k in ("restore", "postcopy", "start") if k in parts}
        if not known:
            return
        scale = min(1.0, total / sum(known.values())) if sum(known.values()) else 1.0
        del self.ms[name]
        self.ms[f"{name}_reading"] = round(max(total - sum(known.values()), 0.0), 3)
        for key, value in known.items():
            self.ms[f"{name}_{key}"] = round(value * scale, 3)

    @property
    def total_ms(self) -> float:
        return (self._last - self._started) * 1000
