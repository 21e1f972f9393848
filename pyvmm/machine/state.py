"""Component state as plain data: dataclasses in, nested dicts and lists of plain values out.

Every stateful part of a machine describes its state as a dataclass with a `VERSION` class
attribute (Firecracker's per-device persist types). `to_plain` turns such a state into plain
data (dict, list, int, float, bool, str, bytes, None) that a snapshot or migration stream can
carry without knowing any component; `from_plain` rebuilds the dataclass from it, checking every
value against the field's declared type, so a corrupt or hostile stream gives a `StateError`
naming the field, never a half-built component.

Supported field types: int, float, bool, str, bytes, nested state dataclasses, `list[T]`,
`tuple[T, ...]`, `dict[K, V]` with int or str keys, `T | None`, and `Any` for a value that is
itself plain data (checked to be, not trusted).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

from pyvmm.errors import PyvmmError

T = TypeVar("T")

_SCALARS: tuple[type, ...] = (int, float, bool, str, bytes)


class StateError(PyvmmError):
    """Saved state cannot be used: unknown component or version, or malformed data."""


def to_plain(state: Any) -> Any:
    """Plain data for a state dataclass (or any supported value)."""
    kind = type(state)
    if kind in _PLAIN:  # first: most values are (a vCPU's MSRs are hundreds of ints)
        return state
    names = _field_names(kind)
    if names is not None:
        return {name: to_plain(getattr(state, name)) for name in names}
    if isinstance(state, list | tuple):
        return [item if type(item) in _PLAIN else to_plain(item) for item in state]
    if isinstance(state, dict):
        return {k: v if type(v) in _PLAIN else to_plain(v) for k, v in state.items()}
    if isinstance(state, _SCALARS):  # (an IntEnum, say)
        return state
    raise TypeError(f"{kind.__name__} is not plain state data")


_PLAIN = frozenset({*_SCALARS, type(None)})


@functools.cache
def _field_names(kind: type) -> tuple[str, ...] | None:
    """The field names of a state dataclass, None for any other type."""
    if not dataclasses.is_dataclass(kind):
        return None
    return tuple(f.name for f in dataclasses.fields(kind))


def from_plain(cls: type[T], data: Any, where: str = "") -> T:
    """Rebuild a `cls` dataclass from `to_plain` output; StateError if it does not fit."""
    return _decode(cls, data, where or cls.__name__)


def prepare(cls: type) -> None:
    """Work out now what `from_plain` needs to know of state type `cls` and of the state types
    inside it: their fields' types, from annotations that are slow to evaluate (some
    milliseconds a machine, far more under emulation). A migration's destination does this
    before the switch-over, so that its restore, in the downtime, does not."""
    learned: set[type] = set()
    pending: list[Any] = [cls]
    while pending:
        hint = pending.pop()
        if dataclasses.is_dataclass(hint) and hint not in learned:
            learned.add(hint)  # type: ignore[arg-type]
            pending.extend(_record(hint)[0].values())  # type: ignore[arg-type]
        pending.extend(typing.get_args(hint))


@functools.cache
def _record(cls: type) -> tuple[dict[str, Any], list[str]]:
    """A state dataclass's field types and the names its constructor takes."""
    return typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls) if f.init]


def _check_plain(data: Any, where: str) -> Any:
    if isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(key, int | str):
                raise StateError(f"{where}: key {key!r} is not plain data")
            _check_plain(value, f"{where}[{key!r}]")
    elif isinstance(data, list | tuple):
        for i, value in enumerate(data):
            _check_plain(value, f"{where}[{i}]")
    elif data is not None and not isinstance(data, _SCALARS):
        raise StateError(f"{where}: a {type(data).__name__} is not plain data")
    return data


def _decode(kind: Any, data: Any, where: str) -> Any:
    if kind in _SCALARS:  # first: most fields are
        # bool is an int in Python; a state field of type int must not take True, nor the reverse
        if type(data) is not kind and not (kind is float and type(data) is int):
            raise StateError(f"{where}: expected {kind.__name__}, got {type(data).__name__}")
        return kind(data)
    if kind is Any:
        return _check_plain(data, where)
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(kind)
        if data is None and type(None) in options:
            return None
        real = [option for option in options if option is not type(None)]
        if len(real) != 1:
            raise TypeError(f"{where}: only `T | None` unions are supported")
        return _decode(real[0], data, where)
    if dataclasses.is_dataclass(kind):
        if not isinstance(data, dict):
            raise StateError(f"{where}: expected a record, got {type(data).__name__}")
        hints, names = _record(kind)
        missing = [name for name in names if name not in data]
        unknown = sorted(set(data) - set(names), key=str)
        if missing or unknown:
            problems = [f"missing {', '.join(missing)}"] if missing else []
            problems += [f"unknown {', '.join(map(repr, unknown))}"] if unknown else []
            raise StateError(f"{where}: fields {'; '.join(problems)}")
        return kind(**{name: _decode(hints[name], data[name], f"{where}.{name}") for name in names})
    if origin in (list, tuple):
        if not isinstance(data, list | tuple):
            raise StateError(f"{where}: expected a list, got {type(data).__name__}")
        (item,) = typing.get_args(kind)[:1]
        if item in _SCALARS and all(type(value) is item for value in data):
            return list(data) if origin is list else tuple(data)  # (quick: no name per item)
        items = [_decode(item, value, f"{where}[{i}]") for i, value in enumerate(data)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(data, dict):
            raise StateError(f"{where}: expected a mapping, got {type(data).__name__}")
        key_type, value_type = typing.get_args(kind)
        scalars = key_type in _SCALARS and value_type in _SCALARS
        if scalars and all(type(k) is key_type and type(v) is value_type for k, v in data.items()):
            return dict(data)  # scalars of the right types (quick: no name per item)
        return {
            _decode(key_type, key, f"{where} key"): _decode(value_type, value, f"{where}[{key!r}]")
            for key, value in data.items()
        }
    raise TypeError(f"{where}: field type {kind!r} is not supported in state")


def require_size(what: str, blob: bytes, size: int, struct: str) -> None:
    """StateError unless `blob` (a kernel struct's raw bytes) is as long as this kernel's."""
    if len(blob) != size:
        raise StateError(
            f"{what} is {len(blob)} bytes, but this kernel's {struct} is {size} "
            "(saved by another kernel, or corrupt)"
        )


def require_uint(what: str, value: int, bits: int) -> None:
    """StateError unless `value` fits the kernel's unsigned field of `bits` bits."""
    if not 0 <= value < 1 << bits:
        raise StateError(f"{what} is {value}, which does not fit in {bits} unsigned bits")
