"""A small ACPI Machine Language (AML) encoder: just what pyvmm's DSDT needs.

AML is the bytecode in the DSDT (ACPI spec 6.5, chapter 20). pyvmm describes its PCI root bridge
and the \\_S5 sleep state with it; everything else the guest learns from static tables. Each
function returns the encoded bytes of one term.
"""

from __future__ import annotations

import struct

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82
ROOT_CHAR = 0x5C
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F


def _name_seg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_"):
        raise ValueError(f"bad AML name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """`\\_SB_.PCI0`, `_HID` ... as an AML NameString."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes((ROOT_CHAR,)), path[1:]
    segs = [_name_seg(s) for s in path.split(".")] if path else []
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes((DUAL_NAME_PREFIX,)) + b"".join(segs)
    return prefix + bytes((MULTI_NAME_PREFIX, len(segs))) + b"".join(segs)


def pkg_length(body_length: int) -> bytes:
    """PkgLength: the encoded length counts its own bytes too."""
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes((total,))
        if extra and total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0xF)
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes((lead,)) + rest
    raise ValueError(f"AML package of {body_length} bytes is too long")


def integer(value: int) -> bytes:
    if value == 0:
        return bytes((ZERO_OP,))
    if value == 1:
        return bytes((ONE_OP,))
    for prefix, fmt, limit in (
        (BYTE_PREFIX, "<B", 0xFF),
        (WORD_PREFIX, "<H", 0xFFFF),
        (DWORD_PREFIX, "<I", 0xFFFFFFFF),
        (QWORD_PREFIX, "<Q", 0xFFFFFFFFFFFFFFFF),
    ):
        if 0 <= value <= limit:
            return bytes((prefix,)) + struct.pack(fmt, value)
    raise ValueError(f"AML integer {value} out of range")


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0A03"): three letters compressed into 15 bits, then four hex digits."""
    if len(text) != 7:
        raise ValueError(f"bad EISA id {text!r}")
    letters = [ord(c) - 0x40 for c in text[:3]]
    compressed = letters[0] << 10 | letters[1] << 5 | letters[2]
    raw = compressed.to_bytes(2, "big") + bytes.fromhex(text[3:])
    return integer(int.from_bytes(raw, "little"))


def name(path: str, value: bytes) -> bytes:
    return bytes((NAME_OP,)) + name_string(path) + value


def package(*elements: bytes) -> bytes:
    body = bytes((len(elements),)) + b"".join(elements)
    return bytes((PACKAGE_OP,)) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes((BUFFER_OP,)) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes((SCOPE_OP,)) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes((EXT_OP_PREFIX, DEVICE_OP)) + pkg_length(len(body)) + body


# Resource descriptors (ACPI 6.5 §6.4), the contents of a _CRS buffer.

_RESOURCE_MEMORY = 0
_RESOURCE_IO = 1
_RESOURCE_BUS = 2
_FLAGS_MIN_MAX_FIXED = 0x0C  # _MIF | _MAF, producer
_IO_ENTIRE_RANGE = 0x03
_MEM_READ_WRITE = 0x01


def _word_address(kind: int, type_flags: int, low: int, high: int) -> bytes:
    body = struct.pack(
        "<BBBHHHHH", kind, _FLAGS_MIN_MAX_FIXED, type_flags, 0, low, high, 0, high - low + 1
    )
    return struct.pack("<BH", 0x88, len(body)) + body


def word_bus_number(low: int, high: int) -> bytes:
    return _word_address(_RESOURCE_BUS, 0, low, high)


def word_io(low: int, high: int) -> bytes:
    return _word_address(_RESOURCE_IO, _IO_ENTIRE_RANGE, low, high)


def _memory_range(tag: int, field: str, low: int, high: int) -> bytes:
    """A read-write memory range with fixed ends: an address space descriptor whose five
    address fields (granularity, minimum, maximum, translation, length) are `field`s."""
    body = struct.pack(
        f"<BBB{field * 5}",
        _RESOURCE_MEMORY,
        _FLAGS_MIN_MAX_FIXED,
        _MEM_READ_WRITE,
        0,
        low,
        high,
        0,
        high - low + 1,
    )
    return struct.pack("<BH", tag, len(body)) + body


def dword_memory(low: int, high: int) -> bytes:
    """A memory range below 4 GiB (the DWord address space descriptor)."""
    return _memory_range(0x87, "I", low, high)


def qword_memory(low: int, high: int) -> bytes:
    """A memory range anywhere in the 64-bit space (the QWord address space descriptor)."""
    return _memory_range(0x8A, "Q", low, high)


def io_port(base: int, length: int) -> bytes:
    """A fixed 16-bit-decoded I/O port range (the small IO descriptor)."""
    return struct.pack("<BBHHBB", 0x47, 0x01, base, base, 1, length)


def irq_no_flags(*irqs: int) -> bytes:
    """ISA IRQs, edge-triggered and active-high (the short IRQ descriptor)."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq < 16:
            raise ValueError(f"ISA IRQ {irq} is not in 0-15")
        mask |= 1 << irq
    return struct.pack("<BH", 0x22, mask)


def end_tag() -> bytes:
    return bytes((0x79, 0x00))


def resource_template(*descriptors: bytes) -> bytes:
    return buffer(b"".join(descriptors) + end_tag())
