"""Emulated MSI (pyvmm.devices.pci.msi) over a recording fake of KVM's irqfds and GSI routes:
the capability's layout and masks, multiple vectors, per-vector masking with pending bits, and
what the owner of forwarded vectors is told. (IrqfdVectors' reliance on KVM firing an event
already pending when an irqfd is assigned is checked against the kernel in test_virtio.)"""

from __future__ import annotations

import select
from collections.abc import Iterator

import pytest
from fakes import FakeGsi

from pyvmm.devices.pci.device import PciFunction
from pyvmm.devices.pci.msi import Msi

CAP = 0x50
CONTROL, ADDRESS, ADDRESS_HI, DATA64, MASK64, PENDING64 = 2, 4, 8, 12, 16, 20
ENABLE, MSI_64BIT, MASKABLE = 0x0001, 0x0080, 0x0100


class FakeVm:
    def __init__(self) -> None:
        self.irqfds: dict[int, int] = {}  # eventfd -> GSI

    def irqfd(self, fd: int, gsi: int, resamplefd: int | None = None) -> None:
        assert fd not in self.irqfds
        self.irqfds[fd] = gsi

    def irqfd_remove(self, fd: int, gsi: int) -> None:
        assert self.irqfds.pop(fd) == gsi


class Function:
    """A PCI function with one MSI capability at CAP, and what its owner was told."""

    def __init__(self, vectors: int = 4, *, is_64bit: bool = True, maskable: bool = True) -> None:
        self.vm, self.gsi = FakeVm(), FakeGsi()
        self.told: list[int] = []
        self.msi = Msi(
            self.vm,  # type: ignore[arg-type]
            self.gsi,  # type: ignore[arg-type]
            vectors,
            is_64bit=is_64bit,
            maskable=maskable,
            on_control=self.told.append,
        )
        self.pci = PciFunction(0x1234, 0x5678, 0)
        assert self.pci.add_capability(self.msi.capability, CAP) == CAP

    def read(self, offset: int, size: int) -> int:
        return self.pci.config_read(CAP + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.pci.config_write(CAP + offset, size, value)

    def program(self, address: int, data: int, *, enabled_log2: int) -> None:
        self.write(ADDRESS, 4, address & 0xFFFF_FFFF)
        self.write(ADDRESS_HI, 4, address >> 32)
        self.write(DATA64, 2, data)
        self.write(CONTROL, 2, ENABLE | enabled_log2 << 4)

    def live(self) -> dict[int, tuple[int, int]]:
        """Vector -> the (address, data) KVM delivers it with, for vectors with an irqfd."""
        routes = {}
        for vector, eventfd in enumerate(self.msi.eventfds):
            gsi = self.vm.irqfds.get(eventfd.fd)
            if gsi is not None:
                routes[vector] = self.gsi.routes[gsi]
        return routes


@pytest.fixture
def function() -> Iterator[Function]:
    made = Function()
    yield made
    made.msi.close()
    assert not made.vm.irqfds and not made.gsi.routes  # close gave everything back


def test_the_capability_has_the_layout_of_its_kind_and_only_its_writable_bits_change() -> None:
    for is_64bit, maskable, length in ((False, False, 10), (True, False, 14), (True, True, 24)):
        made = Function(8, is_64bit=is_64bit, maskable=maskable)
        try:
            assert made.msi.capability.length == length
            control = made.read(CONTROL, 2)
            flags = (MSI_64BIT if is_64bit else 0) | (MASKABLE if maskable else 0)
            assert control == 3 << 1 | flags  # 8 vectors capable
            made.write(CONTROL, 2, 0xFFFF)  # capable bits and flags are read-only
            assert made.read(CONTROL, 2) == control | ENABLE | 0x70
            made.write(ADDRESS, 4, 0xFFFF_FFFF)
            assert made.read(ADDRESS, 4) == 0xFFFF_FFFC  # dword aligned
        finally:
            made.msi.close()
    with pytest.raises(ValueError, match="power of two"):
        Msi(FakeVm(), FakeGsi(), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="power of two"):
        Msi(FakeVm(), FakeGsi(), 64)  # type: ignore[arg-type]


def test_enabled_vectors_send_the_data_with_their_number_in_its_low_bits(
    function: Function,
) -> None:
    function.program(0x1_FEE0_0000, 0x4043, enabled_log2=2)
    assert function.told == [4]
    assert function.live() == {v: (0x1_FEE0_0000, 0x4040 | v) for v in range(4)}
    function.write(DATA64, 2, 0x4051)  # a new message: re-routed, same vectors
    assert function.live() == {v: (0x1_FEE0_0000, 0x4050 | v) for v in range(4)}
    assert function.told == [4]  # the owner hears of changes in the count only
    function.write(CONTROL, 2, ENABLE | 1 << 4)  # two vectors
    assert function.live().keys() == {0, 1} and function.told == [4, 2]
    function.write(CONTROL, 2, 0)  # MSI off
    assert function.live() == {} and function.told == [4, 2, 0]


def test_more_vectors_enabled_than_offered_means_as_many_as_offered(function: Function) -> None:
    function.program(0xFEE0_0000, 0x20, enabled_log2=5)
    assert function.live().keys() == {0, 1, 2, 3} and function.told == [4]


def test_a_masked_vector_pends_and_is_delivered_when_unmasked(function: Function) -> None:
    function.program(0xFEE0_0000, 0x30, enabled_log2=2)
    function.write(MASK64, 4, 0b0110)
    assert function.live().keys() == {0, 3}
    assert function.read(PENDING64, 4) == 0
    function.msi.signal(2)
    function.msi.signal(0)  # live: KVM takes it, it never pends
    assert function.read(PENDING64, 4) == 0b0100
    function.write(PENDING64, 4, 0)  # pending bits are the device's, read-only
    assert function.read(PENDING64, 4) == 0b0100
    function.write(MASK64, 4, 0)  # unmasked: the irqfd goes back, KVM fires what pended
    assert function.live().keys() == {0, 1, 2, 3}
    assert function.read(PENDING64, 4) == 0
    fd = function.msi.eventfds[2].fd
    assert not select.select([fd], [], [], 0)[0]  # consumed, so a later mask shows nothing
    function.write(MASK64, 4, 0b0100)
    assert function.read(PENDING64, 4) == 0
    function.write(MASK64, 4, 0xFFFF_FFFF)  # bits above the vectors offered are read-only
    assert function.read(MASK64, 4) == 0b1111


def test_signals_while_msi_is_off_pend_until_it_is_enabled(function: Function) -> None:
    function.msi.signal(1)
    function.msi.signal(7)  # beyond the vectors: ignored
    assert function.read(PENDING64, 4) == 0b0010
    function.program(0xFEE0_0000, 0x30, enabled_log2=2)
    assert function.read(PENDING64, 4) == 0 and function.live().keys() == {0, 1, 2, 3}


def test_a_message_kvm_refuses_leaves_only_that_vector_without_an_interrupt(
    function: Function, caplog: pytest.LogCaptureFixture
) -> None:
    function.gsi.refuse = lambda address, data: data == 0x61
    function.program(0xFEE0_0000, 0x60, enabled_log2=2)
    assert function.live().keys() == {0, 2, 3}
    assert "MSI vector 1 (address 0xfee00000 data 0x61) has no interrupt route" in caplog.text
    assert len(function.gsi.routes) == 3  # the refused route's GSI was given back
    function.gsi.refuse = lambda address, data: False
    function.write(DATA64, 2, 0x70)  # a message KVM takes: the vector comes back
    assert function.live() == {v: (0xFEE0_0000, 0x70 | v) for v in range(4)}


def test_a_32_bit_capability_without_masking_routes_its_vectors() -> None:
    made = Function(2, is_64bit=False, maskable=False)
    try:
        made.write(ADDRESS, 4, 0xFEE0_1000)
        made.write(8, 2, 0x90)  # the data register follows the 32-bit address
        made.write(CONTROL, 2, ENABLE | 1 << 4)
        assert made.live() == {0: (0xFEE0_1000, 0x90), 1: (0xFEE0_1000, 0x91)}
        assert made.msi.pending_bits() == 0
    finally:
        made.msi.close()
