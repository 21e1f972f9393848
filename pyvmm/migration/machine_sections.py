"""A machine's configuration and component states as stream sections (see stream.py).

- CONFIG (JSON): `{"version": 1, "machine": {"mem_size": ..., "vcpus": ..., "devices": [...]}}`,
  the first section of every stream, so a destination can refuse a machine it cannot build
  before it has read, or touched, anything else.
- INFO (JSON): what the writer records beside the state (when it was written, where the console
  went, the snapshot an incremental one builds on). Readers use what they know of it.
- COMPONENT (msgpack): `[id, kind, version, data]`, one per component, `data` being the
  component's state as plain data (pyvmm.machine.state). msgpack carries bytes, int keys and
  nesting as they are, and its C decoder is bounded in depth; what it gives back is checked
  field by field when the machine decodes it (`Components.decode`), so a hostile section is
  refused there, with its component named.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

from pyvmm.machine.component import SavedState
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.state import StateError, from_plain, to_plain
from pyvmm.migration.stream import Section, SectionType, StreamError


def encode_config(config: MachineConfig) -> bytes:
    return json.dumps({"version": config.VERSION, "machine": to_plain(config)}).encode()


def decode_config(section: Section, what: str) -> MachineConfig:
    if section.type != SectionType.CONFIG:
        raise StreamError(f"{what} does not start with the machine's configuration")
    document = _json(section, what)
    if not isinstance(document, dict) or set(document) != {"version", "machine"}:
        raise StreamError(f"{what}: its configuration section is not a pyvmm configuration")
    if document["version"] != MachineConfig.VERSION:
        raise StreamError(
            f"{what}: its configuration is version {document['version']}; this pyvmm reads "
            f"version {MachineConfig.VERSION} only"
        )
    try:
        return from_plain(MachineConfig, document["machine"], "configuration")
    except StateError as err:
        raise StreamError(f"{what}: {err}") from None
    except RecursionError:
        raise StreamError(f"{what}: its configuration is nested too deeply") from None


def encode_info(info: dict[str, Any]) -> bytes:
    return json.dumps(info).encode()


def decode_info(section: Section, what: str) -> dict[str, Any]:
    info = _json(section, what)
    if not isinstance(info, dict):
        raise StreamError(f"{what}: its INFO section is not a JSON object")
    return info


def encode_component(state: SavedState) -> bytes:
    return msgpack.packb(
        [state.component, state.kind, state.version, state.data], use_bin_type=True
    )


def unpack(payload: bytes, where: str) -> Any:
    """A msgpack section's payload as plain data (int map keys allowed, as states have);
    StreamError naming `where` if it is not msgpack. What it holds is the caller's to check."""
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as err:  # msgpack's errors have no common base: all mean "not msgpack"
        raise StreamError(f"{where} cannot be decoded ({err})") from None


def unpack_row(payload: bytes, where: str, shape: str, *types: type) -> list[Any]:
    """A msgpack payload that must be a list of one item per type in `types`, each of exactly
    that type (`object`: any; exactly, so that a bool is no int), else a StreamError saying
    that `where` is not `shape`."""
    item = unpack(payload, where)
    fits = isinstance(item, list) and len(item) == len(types)
    if not fits or not all(t is object or type(v) is t for v, t in zip(item, types, strict=True)):
        raise StreamError(f"{where} is not {shape}")
    return item


def decode_component(section: Section, what: str) -> SavedState:
    where = f"{what}: the component state at byte {section.offset}"
    row = unpack_row(section.payload, where, "[id, kind, version, data]", str, str, int, object)
    return SavedState(*row)


def _json(section: Section, what: str) -> Any:
    try:
        return json.loads(section.payload)
    except (ValueError, RecursionError) as err:
        name = SectionType(section.type).name
        raise StreamError(f"{what}: its {name} section is not valid JSON ({err})") from None
