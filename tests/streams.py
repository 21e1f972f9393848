"""VM state streams (pyvmm.migration.stream) taken apart and put together again, for tests that
feed a snapshot or a migration damaged or forged streams: a stream's sections
(`sections_of`), sections as a stream with valid checksums (`stream`), and what a refusal of a
damaged stream says (`DAMAGED`)."""

from __future__ import annotations

import io

from pyvmm.migration.stream import SectionType, StreamReader, StreamWriter

#: Why a damaged stream is refused: it ends early, a checksum fails, or what the damage made
#: of the stream's header or a section's head is not something this pyvmm reads.
DAMAGED = (
    r"is truncated|is corrupt|is not a pyvmm VM state stream|in stream format \d+;"
    r"|header flags|which this pyvmm does not know"
)


def sections_of(state: bytes) -> list[tuple[int, int, bytes]]:
    reader = StreamReader(io.BytesIO(state))
    found = []
    while True:
        section = reader.next()
        found.append((section.type, section.flags, section.payload))
        if section.type == SectionType.END:
            return found


def stream(sections: list[tuple[int, int, bytes]]) -> bytes:
    """Sections as a stream with valid checksums (and no END unless given one)."""
    out = io.BytesIO()
    writer = StreamWriter(out)
    for kind, flags, payload in sections:
        writer.section(kind, payload, flags=flags)  # type: ignore[arg-type]
    return out.getvalue()
