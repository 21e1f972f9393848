"""Pre-copy's policy (pyvmm.migration.convergence), without a machine: when rounds end, when
post-copy takes over, and how auto-converge raises the throttle."""

from __future__ import annotations

import pytest

from pyvmm.machine.vcpus import MAX_THROTTLE
from pyvmm.migration.convergence import Convergence, Step
from pyvmm.migration.progress import Progress
from pyvmm.migration.transport import MigrationError

MB = 1_000_000


def policy(**options: object) -> tuple[Convergence, list[float]]:
    """A policy over a link that sent 100 MB/s in its first round (round 0: all of RAM), with
    the throttles it set recorded."""
    progress = Progress()
    progress.round_done(1.0, 100 * MB)
    throttles: list[float] = []
    settings = {"downtime_limit": 0.03, "max_rounds": 30, "auto_converge": False, "postcopy": False}
    settings.update(options)
    return Convergence(progress, throttles.append, **settings), throttles  # type: ignore[arg-type]


def round_of(convergence: Convergence, sent: int, seconds: float = 1.0) -> None:
    convergence.progress.round_done(seconds, sent)


def test_pages_that_fit_the_downtime_switch_over_unless_another_round_halves_them() -> None:
    convergence, _ = policy()
    # The budget: 100 MB/s x 30 ms = 3 MB.
    assert convergence.next_step(100_000) is Step.SWITCH_OVER  # a tenth of it: no more rounds
    # 2 MB fit, and were dirtied at 2 MB/s (the last round took 1 s): one more halves them.
    assert convergence.next_step(2 * MB) is Step.ROUND
    assert convergence.next_step(4 * MB) is Step.ROUND  # too many for the limit


def test_the_destinations_build_time_is_kept_out_of_the_budget_up_to_half() -> None:
    convergence, _ = policy()
    round_of(convergence, 100 * MB, seconds=0.01)  # pages dirtied quickly: rounds do not pay
    convergence.destination_built(1.0)
    assert convergence.switch_over == pytest.approx(0.015)  # half the limit at most
    # 10 GB/s x 15 ms = 150 MB left for the pages: 140 MB fit, 160 MB do not.
    assert convergence.next_step(140 * MB) is Step.SWITCH_OVER
    assert convergence.next_step(160 * MB) is Step.ROUND


def test_a_guest_that_never_fits_fails_after_max_rounds_with_its_rates() -> None:
    convergence, throttles = policy(max_rounds=3)
    for _ in range(2):
        assert convergence.next_step(50 * MB) is Step.ROUND
        round_of(convergence, 50 * MB)
    convergence.progress.dirty_bytes = 50 * MB
    with pytest.raises(MigrationError, match=r"50 MB/s dirtied, 50 MB/s sent.*after 3 rounds"):
        convergence.next_step(50 * MB)
    assert throttles == []  # without auto-converge, the guest is never slowed


def test_auto_converge_throttles_from_the_second_round_by_steps_up_to_its_maximum() -> None:
    convergence, throttles = policy(auto_converge=True, max_rounds=100)
    assert convergence.next_step(50 * MB) is Step.ROUND
    assert throttles == []  # round 1 follows round 0 (all of RAM): it says nothing yet
    round_of(convergence, 50 * MB)
    for _ in range(12):
        assert convergence.next_step(50 * MB) is Step.ROUND  # more than half of 50 MB dirty
        round_of(convergence, 50 * MB)
    assert throttles[:3] == pytest.approx([0.2, 0.3, 0.4])
    assert throttles[-1] == MAX_THROTTLE and max(throttles) == MAX_THROTTLE
    assert convergence.progress.throttle_percent == round(MAX_THROTTLE * 100)
    assert convergence.next_step(10 * MB) is Step.ROUND  # not hot enough: no raise
    assert len(throttles) == 12
    convergence.end()
    assert throttles[-1] == 0


def test_post_copy_takes_over_once_rounds_stop_paying_or_run_out() -> None:
    convergence, _ = policy(postcopy=True)
    assert convergence.next_step(2 * MB) is Step.ROUND  # it still halves: pre-copy goes on
    assert convergence.next_step(60 * MB) is Step.POSTCOPY  # dirtied at more than half the rate
    convergence, _ = policy(postcopy=True, max_rounds=1)
    assert convergence.next_step(2 * MB) is Step.POSTCOPY  # out of rounds before they halved
