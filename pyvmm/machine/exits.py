"""Exit statistics: how many vCPU exits reached pyvmm, and where.

Every exit is counted (`count`). With tracing on, the last 100,000 exits are kept in order
(`trace`: (reason, port or address)), and each vCPU counts its exits by (reason, place) in a
counter of its own, so no thread loses a count to another; `summary()` folds them into the map
`pyvmm run --exit-stats` prints: which device and offset made the guest exit to Python.
"""

from __future__ import annotations

from collections import Counter, deque

from pyvmm.machine.bus import Bus
from pyvmm.uapi.kvm import KvmExit

# summary() names at most this many places per vCPU; a guest probing more addresses
# (unclaimed MMIO, say) has the rest counted together, so tracing memory stays bounded.
MAX_COUNTED_PLACES = 4096
OTHER_PLACES = -1
TRACE_LENGTH = 100_000


def exit_name(reason: int) -> str:
    """KVM_EXIT_<name> for a known exit reason, else the number."""
    return KvmExit(reason).name if reason in KvmExit._value2member_map_ else str(reason)


def _exit_kind(reason: int) -> str:
    return "pio" if reason == KvmExit.IO else exit_name(reason).lower()


class ExitStats:
    """Exit counts of one machine; `trace` and the per-vCPU counters exist only if tracing."""

    def __init__(self, vcpus: int, pio: Bus, mmio: Bus, *, trace: bool) -> None:
        self.count = 0
        self.trace: deque[tuple[int, int]] | None = deque(maxlen=TRACE_LENGTH) if trace else None
        self.per_vcpu: list[Counter[tuple[int, int]]] = [Counter() for _ in range(vcpus)]
        self._buses = {int(KvmExit.IO): pio, int(KvmExit.MMIO): mmio}

    @staticmethod
    def record(counts: Counter[tuple[int, int]], reason: int, where: int) -> None:
        """Count one exit of a vCPU (the exit loop calls this only when tracing)."""
        key = (reason, where)
        if key not in counts and len(counts) >= MAX_COUNTED_PLACES:
            key = (reason, OTHER_PLACES)
        counts[key] += 1

    def summary(self) -> list[tuple[str, str, int]]:
        """With tracing: (kind, where, count) for every kind of exit seen, most frequent first.
        `where` names the device range and the offset in it (`COM1+0x5`), or the bare address
        when no device claims it."""
        totals: Counter[tuple[str, str]] = Counter()
        for (reason, where), count in sum(self.per_vcpu, Counter()).items():
            bus = self._buses.get(reason)
            if where == OTHER_PLACES:
                place = "(other places)"
            elif bus is not None:
                found = bus.find(where)
                place = f"{where:#x}" if found is None else f"{found.name}+{where - found.base:#x}"
            else:
                place = ""
            totals[_exit_kind(reason), place] += count
        return [(kind, where, count) for (kind, where), count in totals.most_common()]
