"""Where the lab machine's CPUs are when the lab hangs: QEMU's QMP monitor, asked from outside.

A lab that hangs as a whole says nothing on its console, and its kernel cannot be asked. QEMU
can: its monitor answers from QEMU's main loop while the emulated CPUs run. Sampled a few times,
each CPU's RIP, CR3 and halt state tell apart a lab kernel that is halted and never woken (an
interrupt lost), one spinning in a loop (in itself or in a nested guest, whose CR3 differs),
and a QEMU whose main loop is stuck (the monitor does not answer). The host's view of QEMU's
vCPU threads (running or asleep, CPU time used) completes the picture.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: How long the monitor may take to answer one command.
ANSWER_TIMEOUT = 3.0
_CPU_HEADER = re.compile(r"^CPU#(\d+)$", re.MULTILINE)
_RIP = re.compile(r"RIP=([0-9a-f]+) .*CPL=(\d) .*HLT=(\d)")
_CR3 = re.compile(r"CR3=([0-9a-f]+)")


class MonitorError(Exception):
    """The monitor did not answer, or answered with an error."""


@dataclass(frozen=True)
class CpuSample:
    index: int
    rip: int
    cr3: int
    cpl: int
    halted: bool


@dataclass(frozen=True)
class HangEvidence:
    summary: str  # one clause for an error line
    text: str  # everything gathered, for a report


class Qmp:
    """A QMP session on a connected socket (QEMU's `-mon chardev=...,mode=control`)."""

    def __init__(self, sock: socket.socket, timeout: float = ANSWER_TIMEOUT) -> None:
        self._sock = sock
        self._timeout = timeout
        self._buffer = bytearray()
        self._message()  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._message()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise MonitorError(f"{command}: {message['error'].get('desc', message['error'])}")
            # anything else is an asynchronous event: not the answer

    def hmp(self, command_line: str) -> str:
        """A human monitor command's output (`info registers`, `info lapic`)."""
        output = self.execute("human-monitor-command", **{"command-line": command_line})
        return str(output).replace("\r\n", "\n")

    def _message(self) -> dict[str, Any]:
        deadline = time.monotonic() + self._timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                raise MonitorError(f"QEMU's monitor did not answer within {self._timeout:g} s")
            data = self._sock.recv(65536)
            if not data:
                raise MonitorError("QEMU's monitor closed")
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        try:
            message = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MonitorError(f"QEMU's monitor said something that is not JSON: {exc}") from exc
        if not isinstance(message, dict):
            raise MonitorError("QEMU's monitor said something that is not a JSON object")
        return message


def parse_registers(text: str) -> list[CpuSample]:
    """The CPUs in `info registers -a`'s output (x86_64), in its order."""
    text = text.replace("\r\n", "\n")  # (the human monitor's line ends)
    samples = []
    headers = list(_CPU_HEADER.finditer(text))
    for header, following in zip(headers, [*headers[1:], None], strict=False):
        block = text[header.end() : following.start() if following else len(text)]
        rip, cr3 = _RIP.search(block), _CR3.search(block)
        if rip is None or cr3 is None:
            continue
        samples.append(
            CpuSample(
                index=int(header.group(1)),
                rip=int(rip.group(1), 16),
                cr3=int(cr3.group(1), 16),
                cpl=int(rip.group(2)),
                halted=rip.group(3) == "1",
            )
        )
    return samples


def thread_times(pid: int) -> dict[int, tuple[str, int]]:
    """Each thread of `pid`: (its name and state, like "qemu-system-x86 R", its CPU ticks)."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        threads[int(task.name)] = (f"{name} {fields[0]}", int(fields[11]) + int(fields[12]))
    return threads


def describe_cpu(samples: list[CpuSample], busy: float | None) -> str:
    """One CPU over the samples: where it was, whether it moved, halted, and how busy its thread
    was ("CPU 0 at ffffffff81a2b3c4 each time, not halted, CPL 0, cr3 0x2a1c000, thread busy
    100%")."""
    rips = list(dict.fromkeys(f"{s.rip:x}" for s in samples))
    cr3s = list(dict.fromkeys(f"{s.cr3:#x}" for s in samples))
    halted = {s.halted for s in samples}
    where = f"at {rips[0]} each time" if len(rips) == 1 else f"at {', '.join(rips[:4])}"
    state = "halted" if halted == {True} else "not halted" if halted == {False} else "halting"
    line = f"CPU {samples[0].index} {where}, {state}, CPL {samples[-1].cpl}, cr3 {'/'.join(cr3s)}"
    return line + (f", thread busy {busy:.0%}" if busy is not None else "")


def hang_evidence(
    sock: socket.socket, qemu_pid: int, samples: int = 3, interval: float = 0.5
) -> HangEvidence:
    """Sample the lab machine's CPUs `samples` times, `interval` apart, and its vCPU threads."""
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    before, started = thread_times(qemu_pid), time.monotonic()
    dumps: list[str] = []
    try:
        qmp = Qmp(sock)
        cpus = qmp.execute("query-cpus-fast")
        vcpu_threads = {cpu["cpu-index"]: cpu["thread-id"] for cpu in cpus}
        for sample in range(samples):
            if sample:
                time.sleep(interval)
            dumps.append(qmp.hmp("info registers -a"))
        lapic = qmp.hmp("info lapic")
    except (MonitorError, OSError) as exc:
        threads = thread_times(qemu_pid)
        states = ", ".join(sorted({state for state, _ in threads.values()}))
        return HangEvidence(f"{exc} (QEMU's threads: {states})", str(exc))
    elapsed = time.monotonic() - started
    after = thread_times(qemu_pid)
    by_cpu: dict[int, list[CpuSample]] = {}
    for dump in dumps:
        for cpu in parse_registers(dump):
            by_cpu.setdefault(cpu.index, []).append(cpu)
    lines = []
    for index, cpu_samples in sorted(by_cpu.items()):
        tid = vcpu_threads.get(index)
        busy = None
        if tid in before and tid in after and elapsed > 0:
            busy = (after[tid][1] - before[tid][1]) / ticks_per_second / elapsed
        lines.append(describe_cpu(cpu_samples, busy))
    text = [f"-- info registers -a, sample {n}\n{_without_fpu(d)}" for n, d in enumerate(dumps, 1)]
    text.append(f"-- info lapic (CPU 0)\n{lapic}")
    threads = "; ".join(f"{tid} {state}" for tid, (state, _) in sorted(after.items()))
    text.append(f"-- QEMU's threads: {threads}")
    summary = f"{'; '.join(lines)} ({len(dumps)} samples over {elapsed:.1f} s)"
    return HangEvidence(summary, "\n".join(text))


def _without_fpu(dump: str) -> str:
    """`info registers` without the FPU and vector registers, which say nothing of a hang."""
    return "\n".join(
        line for line in dump.splitlines() if not line.startswith(("FPR", "YMM", "XMM", "ZMM"))
    )
