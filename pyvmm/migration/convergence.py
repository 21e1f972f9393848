"""When a live migration's pre-copy rounds end, and how the guest is slowed down to get there.

Rounds go on while the pages left would take longer to send, at the bandwidth the last round had,
than the downtime limit allows, less what the switch-over itself takes besides (the state, the
destination's restore: estimated by how long the destination took to build its machine, at most
half the limit); and while they fit, rounds still go on as long as each would halve what is left
(the guest dirties pages at less than half the rate they are sent), down to a tenth of that budget,
so that the downtime is that of a last round as short as the guest's pace allows.

A guest that dirties pages faster than they can be sent never fits: after `max_rounds` rounds the
migration fails with the rates in its message, unless `auto_converge` throttles it (QEMU's
policy, quicker): from the second round, each round whose pages do not fit and that finds dirty
more than half of what the round before it sent raises the vCPU throttle, to 20% first, then by
10 points a round up to 99%. With post-copy, pre-copy ends as soon as its rounds stop paying (the
guest dirties more than half as fast as pages are sent, or `max_rounds` went by) with pages left
that do not fit the limit: then the destination runs first, and the pages follow.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from pyvmm.machine.vcpus import MAX_THROTTLE
from pyvmm.migration.progress import Progress
from pyvmm.migration.transport import MigrationError

THROTTLE_FIRST, THROTTLE_STEP = 0.2, 0.1  # auto-converge's first throttle and its increments
THROTTLE_TRIGGER = 0.5  # dirty / sent (of the round before) above which a round is too hot


class Step(enum.Enum):
    ROUND = "another round of pre-copy"
    SWITCH_OVER = "pause, send the rest and the state"
    POSTCOPY = "pause, send the state, then the rest with the destination running"


class Convergence:
    """The policy above, for one migration: `next_step(left)` after each look at the dirty log.
    It reads the rounds' figures from `progress` and slows the guest with `throttle`."""

    def __init__(
        self,
        progress: Progress,
        throttle: Callable[[float], None],
        *,
        downtime_limit: float,
        max_rounds: int,
        auto_converge: bool,
        postcopy: bool,
    ) -> None:
        self.progress = progress
        self._throttle = throttle
        self.downtime_limit = downtime_limit
        self.max_rounds = max_rounds
        self.auto_converge = auto_converge
        self.postcopy = postcopy
        self.switch_over = 0.0  # seconds of the downtime spent besides the last pages
        self.throttled = 0.0  # the fraction auto-converge set

    def destination_built(self, seconds: float) -> None:
        """What the downtime spends besides sending the last pages: saving and sending the
        state, and the destination restoring and starting it. The destination building its
        machine (`seconds`, the wait for "accept") is of that order, so that much of the limit
        is kept for it, at most half."""
        self.switch_over = min(seconds, self.downtime_limit / 2)

    def next_step(self, left: int) -> Step:
        """What to do with `left` bytes of dirty pages; MigrationError if the migration cannot
        converge. Raises the throttle first when auto-converge calls for it."""
        progress = self.progress
        budget = progress.bandwidth * (self.downtime_limit - self.switch_over)
        if left <= budget and not self._worth_another_round(left, budget):
            return Step.SWITCH_OVER
        if self.postcopy and (
            progress.round >= self.max_rounds or not self._worth_another_round(left, budget)
        ):
            return Step.POSTCOPY  # pre-copy stopped paying
        if progress.round >= self.max_rounds:
            if left <= budget:
                return Step.SWITCH_OVER
            raise MigrationError(self._no_convergence())
        if self.auto_converge and left > budget:  # (not while converging)
            self._converge(left)
        return Step.ROUND

    def end(self) -> None:
        """The migration ended, either way: the guest runs at full speed again."""
        self._throttle(0)
        self.throttled = 0.0

    def _worth_another_round(self, left: int, budget: float) -> bool:
        """Whether one more round, with the guest running, would shrink the pages left (and
        the downtime) by half at least: the guest dirtied them at less than half the rate
        they are sent. Not for what is already a tenth of the budget."""
        if left <= budget / 10:
            return False
        dirty_rate = left / max(self.progress.rounds[-1]["seconds"], 1e-6)
        return dirty_rate < self.progress.bandwidth / 2

    def _converge(self, dirty: int) -> None:
        """Raise the throttle if the guest dirtied more than THROTTLE_TRIGGER of what the last
        round sent (round 0, all of RAM, says nothing of the guest's pace)."""
        progress = self.progress
        if progress.round < 2 or dirty <= THROTTLE_TRIGGER * progress.rounds[-1]["bytes"]:
            return
        now = self.throttled
        self.throttled = min(THROTTLE_FIRST if not now else now + THROTTLE_STEP, MAX_THROTTLE)
        self._throttle(self.throttled)
        progress.throttle_percent = round(self.throttled * 100)

    def _no_convergence(self) -> str:
        progress = self.progress
        dirty_rate = progress.dirty_bytes / max(progress.rounds[-1]["seconds"], 1e-6)
        if self.auto_converge:
            throttled = f" (throttled to {progress.throttle_percent}%)"
            remedy = "raise the downtime limit or migrate a quieter guest"
        else:
            throttled = ""
            remedy = (
                "raise the downtime limit, let the migration slow the guest down "
                "(pyvmm migrate --auto-converge) or migrate a quieter guest"
            )
        return (
            f"the guest{throttled} dirties memory about as fast as it can be sent "
            f"({dirty_rate / 1e6:.0f} MB/s dirtied, {progress.bandwidth / 1e6:.0f} MB/s "
            f"sent): after {self.max_rounds} rounds {progress.dirty_bytes >> 10} KiB were "
            f"still left, more than {self.downtime_limit * 1000:.0f} ms of downtime allows; "
            f"{remedy} (the source runs on)"
        )
