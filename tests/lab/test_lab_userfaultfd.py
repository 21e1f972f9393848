"""userfaultfd under the lab's KVM (a TDP MMU, as post-copy migration's destinations have): a
vCPU's access to a missing page of memfd RAM waits in KVM until the fd's reader fills it."""

from __future__ import annotations

import pytest
from counting import run_counter_on_demand
from guestbuild import guest

from pyvmm.kvm.userfaultfd import UserFaultFd


def build_counter() -> None:
    """Built on the host: inside the lab the checkout is read-only."""
    guest("counter")


@pytest.mark.lab(before=build_counter)
def test_a_vcpu_touching_a_missing_page_waits_in_kvm_until_it_is_filled() -> None:
    with UserFaultFd() as uffd:
        run_counter_on_demand(uffd)
