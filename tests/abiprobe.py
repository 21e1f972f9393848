"""Check a pyvmm uAPI module (ctypes mirror of a kernel header) against C, with a compiled probe.

`check_module(module, include_dir, workdir)` returns a list of problems (empty: the module
matches the headers). What it checks, and the conventions a uAPI module follows for that:

Structures
    Every ``ctypes.Structure``/``ctypes.Union`` subclass defined in the module whose name does not
    start with ``_`` stands for ``struct NAME`` (``union NAME`` for a Union). Checked: sizeof,
    alignment, and for every field, recursively through nested records, arrays of records (their
    element 0) and anonymous members: offsetof and sizeof. Bitfields (3-tuples in ``_fields_``)
    are checked by setting all their bits in a zeroed object, in C and in ctypes, and comparing the
    bytes. Anonymous C unions/structs are ctypes fields listed in ``_anonymous_``: the wrapper's
    own name does not exist in C and is skipped, its members are checked as members of the
    enclosing record (``offsetof(struct x, inner)``). Zero-length arrays (``c_uint64 * 0``) stand
    for flexible array members; only their offset is checked. Classes whose names start with
    ``_`` are C types without a tag (checked only through the members that use them) or
    Python-only helpers.

    From the probe's DWARF (pyelftools), C members that the Python class lacks are reported too
    (flexible array members excepted: the convention omits them), so a forgotten field that
    would fit in tail padding is still found.

Constants
    Module-level ``int`` (not bool) and ``str`` values whose names start with an upper-case letter
    are C macros or enumerators of the same name: ioctl numbers, flags, and so on. Ints are
    compared at the width of the C expression (``sizeof(NAME)``), so ``-1`` and ``0xffffffff``
    both match an ``int`` -1, while values that do not fit that width are mismatches. Strings
    must be C string literals.

    ``enum.Enum`` subclasses (``IntEnum``/``IntFlag``) defined in the module must all appear in
    the module-level mapping ``C_PREFIX = {Class: "PREFIX_"}`` or ``{Class: ("PREFIX_",
    "_SUFFIX")}``: member ``X`` (aliases included) is the C name ``PREFIX_X_SUFFIX``.

Headers
    ``C_HEADERS`` (module-level tuple, default ``("linux/<module>.h",)``) are included by the
    probe. Modules that also set ``C_COMPLETE_HEADERS`` claim to cover those headers completely:
    every named struct/union and enumerator declared in them, and every object-like ``#define``
    with a non-empty value, must be in the module, except names starting with ``_`` and names in
    an optional ``C_OMIT`` collection.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

_RECORD = (ctypes.Structure, ctypes.Union)
_ARRAY = type(ctypes.c_int * 1)
_NAME = re.compile(r"[A-Z]")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass
class _Check:
    label: str  # shown in mismatch messages
    kind: str  # "int": PI(expr) | "str": string literal | "bits": bitfield pattern
    expr: str  # C expression ("bits": the member path)
    expected: int | bytes
    ctype: str = ""  # "bits": the C type of the root record


def _is_record(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, _RECORD)


def _c_type(cls: type) -> str:
    return f"{'union' if issubclass(cls, ctypes.Union) else 'struct'} {cls.__name__}"


def _fields(cls: type) -> Iterator[tuple[str, Any, int | None]]:
    for field in cls._fields_:
        yield field[0], field[1], field[2] if len(field) > 2 else None


def _py_members(cls: type) -> dict[str, Any]:
    """The C-visible members of a record: anonymous members' members flattened in."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    out: dict[str, Any] = {}
    for name, ftype, _bits in _fields(cls):
        if name in anonymous:
            out.update(_py_members(ftype))
        else:
            out[name] = ftype
    return out


@dataclass
class _Field:
    cpath: str  # C member designator relative to the root record
    pypath: tuple[str | int, ...]  # attribute names / indexes from a root instance
    offset: int
    ftype: Any
    bits: int | None


def _walk(cls: type, cprefix: str, pyprefix: tuple, base: int) -> Iterator[_Field]:
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ftype, bits in _fields(cls):
        offset = base + getattr(cls, name).offset
        pypath = (*pyprefix, name)
        if name in anonymous:
            yield from _walk(ftype, cprefix, pypath, offset)
            continue
        cpath = cprefix + name
        yield _Field(cpath, pypath, offset, ftype, bits)
        if bits is not None:
            continue
        if _is_record(ftype):
            yield from _walk(ftype, cpath + ".", pypath, offset)
        elif isinstance(ftype, _ARRAY) and ftype._length_ > 0 and _is_record(ftype._type_):
            yield from _walk(ftype._type_, cpath + "[0].", (*pypath, 0), offset)


def _bit_pattern(cls: type, field: _Field) -> bytes:
    obj: Any = cls()
    root = obj
    for step in field.pypath[:-1]:
        obj = obj[step] if isinstance(step, int) else getattr(obj, step)
    signed = field.ftype(-1).value == -1
    value = -1 if signed else (1 << field.bits) - 1
    setattr(obj, field.pypath[-1], value)
    return bytes(root)


def _record_checks(cls: type) -> list[_Check]:
    ctype = _c_type(cls)
    checks = [
        _Check(f"{ctype}: sizeof", "int", f"sizeof({ctype})", ctypes.sizeof(cls)),
        _Check(f"{ctype}: alignment", "int", f"_Alignof({ctype})", ctypes.alignment(cls)),
    ]
    for field in _walk(cls, "", (), 0):
        where = f"{ctype}.{field.cpath}"
        if field.bits is not None:
            pattern = _bit_pattern(cls, field)
            checks.append(_Check(f"{where}: bits", "bits", field.cpath, pattern, ctype))
            continue
        checks.append(
            _Check(f"{where}: offset", "int", f"offsetof({ctype}, {field.cpath})", field.offset)
        )
        if isinstance(field.ftype, _ARRAY) and field.ftype._length_ == 0:
            continue  # a flexible array member: it has no size
        member = f"((({ctype} *)0)->{field.cpath})"
        checks.append(
            _Check(f"{where}: size", "int", f"sizeof{member}", ctypes.sizeof(field.ftype))
        )
    return checks


def _headers(module: ModuleType) -> tuple[str, ...]:
    short = module.__name__.rsplit(".", 1)[-1]
    return tuple(getattr(module, "C_HEADERS", (f"linux/{short}.h",)))


def _complete_headers(module: ModuleType) -> tuple[str, ...]:
    return tuple(getattr(module, "C_COMPLETE_HEADERS", ()))


def _own(module: ModuleType, value: Any) -> bool:
    return isinstance(value, type) and value.__module__ == module.__name__


def collect(module: ModuleType) -> tuple[list[_Check], list[type], dict[str, str], list[str]]:
    """Checks of a module; its record classes; C names covered (name -> label); problems."""
    checks: list[_Check] = []
    records: list[type] = []
    names: dict[str, str] = {}
    problems: list[str] = []
    prefixes = getattr(module, "C_PREFIX", {})
    for name, value in vars(module).items():
        if _is_record(value) and _own(module, value) and not name.startswith("_"):
            records.append(value)
            checks.extend(_record_checks(value))
        elif _own(module, value) and issubclass(value, enum.Enum):
            if value not in prefixes:
                problems.append(f"enum class {name} has no C_PREFIX entry, so it is unchecked")
        elif isinstance(value, int | str) and not isinstance(value, bool) and _NAME.match(name):
            names[name] = name
            if isinstance(value, str):
                checks.append(_Check(name, "str", name, value.encode()))
            else:
                checks.append(_Check(name, "int", name, int(value)))
    for cls, affix in prefixes.items():
        if not (_own(module, cls) and issubclass(cls, enum.Enum)):
            problems.append(f"C_PREFIX key {cls!r} is not an enum class of this module")
            continue
        prefix, suffix = (affix, "") if isinstance(affix, str) else affix
        for member, value in cls.__members__.items():
            cname = f"{prefix}{member}{suffix}"
            label = f"{cls.__name__}.{member} ({cname})"
            if not _IDENT.match(cname):
                problems.append(f"{label}: not a C identifier")
                continue
            names[cname] = label
            checks.append(_Check(label, "int", cname, int(value)))
    return checks, records, names, problems


_PRELUDE = r"""
#include <stddef.h>
#include <stdio.h>
#include <string.h>
static void pi(int i, size_t size, unsigned long long v) { printf("%d %zu %llx\n", i, size, v); }
static void pb(int i, const void *p, size_t n)
{
	const unsigned char *b = p;
	printf("%d b ", i);
	for (size_t k = 0; k < n; k++)
		printf("%02x", b[k]);
	printf("\n");
}
#define PI(i, e) pi(i, sizeof(e), (unsigned long long)(e))
#define PS(i, e) pb(i, "" e, sizeof("" e) - 1)
"""


def _c_statement(i: int, check: _Check) -> str:
    if check.kind == "int":
        return f"PI({i}, {check.expr});"
    if check.kind == "str":
        return f"PS({i}, {check.expr});"
    return (
        f"{{ union {{ {check.ctype} s; unsigned char b[sizeof({check.ctype})]; }} u; "
        f"memset(&u, 0, sizeof(u)); u.s.{check.expr} = ~0ULL; pb({i}, u.b, sizeof(u.b)); }}"
    )


def _write_probe(path: Path, headers: tuple[str, ...], checks: dict[int, _Check]) -> dict[int, int]:
    """Write the probe; return C line number -> check index."""
    lines = _PRELUDE.strip("\n").splitlines()
    lines += [f"#include <{h}>" for h in headers]
    lines.append("int main(void)")
    lines.append("{")
    line_of: dict[int, int] = {}
    for i, check in checks.items():
        lines.append("\t" + _c_statement(i, check))
        line_of[len(lines)] = i
    lines += ["\treturn 0;", "}", ""]
    path.write_text("\n".join(lines))
    return line_of


_DIAG = re.compile(
    r"^(?P<file>[^:\s]+):(?P<line>\d+):(?:\d+:)? (?P<kind>\w+(?: \w+)?): (?P<msg>.*)$"
)


def _compile_errors(stderr: str, probe: Path) -> dict[int, str]:
    """C line of the probe -> first error message attributed to it."""
    out: dict[int, str] = {}
    last_error = ""
    for text in stderr.splitlines():
        m = _DIAG.match(text)
        if not m:
            continue
        if m["kind"] in ("error", "fatal error"):
            last_error = m["msg"]
        if Path(m["file"]).name == probe.name and last_error:
            out.setdefault(int(m["line"]), last_error)
    return out


def _gcc(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C"}  # plain ASCII diagnostics
    return subprocess.run(["gcc", *args], capture_output=True, text=True, check=False, env=env)


def _compile(
    workdir: Path, include_dir: Path, headers: tuple[str, ...], checks: list[_Check]
) -> tuple[Path | None, dict[int, _Check], list[str]]:
    """Compile the probe, dropping checks that do not compile (reported) until the rest does."""
    pending = dict(enumerate(checks))
    problems: list[str] = []
    source = workdir / "probe.c"
    binary = workdir / "probe"
    flags = ["-std=gnu11", "-O0", "-w", "-g", "-gdwarf-4", "-fno-eliminate-unused-debug-types"]
    flags += ["-fdiagnostics-plain-output", f"-I{include_dir}", str(source), "-o", str(binary)]
    for _attempt in range(5):
        line_of = _write_probe(source, headers, pending)
        result = _gcc(flags)
        if result.returncode == 0:
            return binary, pending, problems
        errors = _compile_errors(result.stderr, source)
        failed = {line_of[line]: msg for line, msg in errors.items() if line in line_of}
        if not failed:
            problems.append(f"the probe does not compile:\n{result.stderr.strip()}")
            return None, pending, problems
        for i, msg in sorted(failed.items()):
            problems.append(f"{pending.pop(i).label}: not valid in C: {msg}")
    problems.append("the probe still does not compile after dropping the failing checks")
    return None, pending, problems


def _format(value: int) -> str:
    return f"{value:#x} ({value})" if value > 9 or value < 0 else str(value)


def _bit_ranges(data: bytes) -> str:
    """The set bits of a little-endian byte string, as ranges of bit numbers."""
    value = int.from_bytes(data, "little")
    ranges: list[str] = []
    bit = 0
    while value >> bit:
        if value >> bit & 1:
            end = bit
            while value >> (end + 1) & 1:
                end += 1
            ranges.append(f"{bit}-{end}" if end > bit else str(bit))
            bit = end + 1
        else:
            bit += 1
    return ", ".join(ranges) or "none"


def _compare(checks: dict[int, _Check], output: str) -> list[str]:
    problems: list[str] = []
    seen: set[int] = set()
    for text in output.splitlines():
        index, rest = text.split(" ", 1)
        i = int(index)
        seen.add(i)
        check = checks[i]
        if isinstance(check.expected, bytes):
            got = bytes.fromhex(rest.split(" ", 1)[1])
            if got == check.expected:
                continue
            if check.kind == "str":
                problems.append(f"{check.label}: C {got!r}, Python {check.expected!r}")
            else:
                c_bits, py_bits = _bit_ranges(got), _bit_ranges(check.expected)
                problems.append(f"{check.label}: C bits {c_bits}, Python bits {py_bits}")
            continue
        size_text, hex_value = rest.split()
        bits = 8 * int(size_text)
        mask = (1 << bits) - 1
        c_value = int(hex_value, 16) & mask
        fits = -(1 << (bits - 1)) <= check.expected <= mask
        if not fits or (check.expected & mask) != c_value:
            signed = c_value - (1 << bits) if c_value >> (bits - 1) else c_value
            shown = _format(c_value) if signed == c_value else f"{_format(c_value)} = {signed}"
            problems.append(f"{check.label}: C {shown}, Python {_format(check.expected)}")
    for i in sorted(set(checks) - seen):
        problems.append(f"{checks[i].label}: the probe printed no value")
    return problems


# ---- DWARF: C members missing in Python, and the headers' declarations (completeness) ----


def _strip(die: Any) -> Any:
    while die.tag in ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type"):
        die = die.get_DIE_from_attribute("DW_AT_type")
    return die


def _die_name(die: Any) -> str | None:
    attr = die.attributes.get("DW_AT_name")
    return attr.value.decode() if attr else None


def _c_members(die: Any, in_union: bool = False) -> dict[str, tuple[Any, bool]]:
    """C-visible members (anonymous ones flattened): name -> (type DIE, is a union alternative)."""
    in_union = in_union or die.tag == "DW_TAG_union_type"
    out: dict[str, tuple[Any, bool]] = {}
    for child in die.iter_children():
        if child.tag != "DW_TAG_member":
            continue
        ctype = _strip(child.get_DIE_from_attribute("DW_AT_type"))
        name = _die_name(child)
        if name is None:
            out.update(_c_members(ctype, in_union))
        else:
            out[name] = (ctype, in_union)
    return out


def _is_empty(die: Any) -> bool:
    """A zero-sized member: __DECLARE_FLEX_ARRAY's ``struct { } __empty_NAME``."""
    size = die.attributes.get("DW_AT_byte_size")
    return die.tag in _RECORD_TAGS and size is not None and size.value == 0


def _is_flexible(die: Any) -> bool:
    if die.tag != "DW_TAG_array_type":
        return False
    for sub in die.iter_children():
        if sub.tag == "DW_TAG_subrange_type":
            count = sub.attributes.get("DW_AT_count")
            upper = sub.attributes.get("DW_AT_upper_bound")
            if count is None and upper is None:
                return True
            if count is not None and count.value == 0:
                return True
            return upper is not None and upper.value in (-1, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)
    return False


_RECORD_TAGS = ("DW_TAG_structure_type", "DW_TAG_union_type")


def _missing_members(cls: type, die: Any, label: str, strict: bool) -> list[str]:
    """C members the Python class lacks. Flexible arrays and zero-sized members may always be
    left out; union alternatives too (the union's size is checked) unless `strict`."""
    problems: list[str] = []
    py = _py_members(cls)
    for name, (ctype, alternative) in _c_members(die).items():
        if name not in py:
            optional = _is_flexible(ctype) or _is_empty(ctype) or (alternative and not strict)
            if not optional:
                problems.append(f"{label}: C member '{name}' is missing in Python")
            continue
        ptype = py[name]
        if _is_record(ptype) and ctype.tag in _RECORD_TAGS:
            problems += _missing_members(ptype, ctype, f"{label}.{name}", strict)
        elif (
            isinstance(ptype, _ARRAY)
            and _is_record(ptype._type_)
            and ctype.tag == "DW_TAG_array_type"
        ):
            element = _strip(ctype.get_DIE_from_attribute("DW_AT_type"))
            if element.tag in _RECORD_TAGS:
                problems += _missing_members(ptype._type_, element, f"{label}.{name}[]", strict)
    return problems


@dataclass
class _Declarations:
    records: dict[str, tuple[Any, str]]  # "struct x" -> (DIE, declaring file)
    enumerators: dict[str, str]  # name -> declaring file


def _file_table(dwarf: Any, cu: Any) -> list[str]:
    program = dwarf.line_program_for_CU(cu)
    comp_dir = cu.get_top_DIE().attributes["DW_AT_comp_dir"].value.decode()
    dirs = [comp_dir] + [d.decode() for d in program["include_directory"]]
    return [
        str(Path(dirs[entry.dir_index]) / entry.name.decode()) for entry in program["file_entry"]
    ]


def _declarations(dwarf: Any) -> _Declarations:
    records: dict[str, tuple[Any, str]] = {}
    enumerators: dict[str, str] = {}
    for cu in dwarf.iter_CUs():
        files = _file_table(dwarf, cu)
        for die in cu.iter_DIEs():
            if "DW_AT_declaration" in die.attributes:
                continue
            decl = die.attributes.get("DW_AT_decl_file")
            where = files[decl.value - 1] if decl and decl.value else ""
            if die.tag in _RECORD_TAGS and (name := _die_name(die)):
                kind = "union" if die.tag == "DW_TAG_union_type" else "struct"
                records.setdefault(f"{kind} {name}", (die, where))
            elif die.tag == "DW_TAG_enumeration_type":
                for child in die.iter_children():
                    if child.tag == "DW_TAG_enumerator":
                        enumerators.setdefault(_die_name(child) or "", where)
    return _Declarations(records, enumerators)


_LINE_MARKER = re.compile(r'^# \d+ "(?P<file>[^"]*)"')
_DEFINE = re.compile(r"^#define (?P<name>[A-Za-z_]\w*)(?P<rest>.*)$")


def _macros(workdir: Path, include_dir: Path, headers: tuple[str, ...]) -> dict[str, str]:
    """Object-like macros with a value: name -> declaring file."""
    source = workdir / "macros.c"
    source.write_text("".join(f"#include <{h}>\n" for h in headers))
    result = _gcc(["-E", "-dD", f"-I{include_dir}", str(source)])
    if result.returncode != 0:
        raise RuntimeError(f"gcc -E failed:\n{result.stderr}")
    out: dict[str, str] = {}
    current = ""
    for text in result.stdout.splitlines():
        if m := _LINE_MARKER.match(text):
            current = m["file"]
        elif (m := _DEFINE.match(text)) and not m["rest"].startswith("(") and m["rest"].strip():
            out.setdefault(m["name"], current)
    return out


def _completeness(
    module: ModuleType,
    include_dir: Path,
    workdir: Path,
    decls: _Declarations,
    records: list[type],
    names: dict[str, str],
) -> list[str]:
    complete = _complete_headers(module)
    if not complete:
        return []
    wanted = {str((include_dir / h).resolve()): h for h in complete}

    def header(path: str) -> str | None:
        return wanted.get(str(Path(path).resolve())) if path else None

    omit = set(getattr(module, "C_OMIT", ()))
    have_records = {_c_type(cls) for cls in records}
    problems: list[str] = []
    for ctype, (_die, where) in sorted(decls.records.items()):
        name = ctype.split()[1]
        if (h := header(where)) and ctype not in have_records and name not in omit:
            problems.append(f"{ctype} ({h}) has no Python class")
    constants = dict(decls.enumerators)
    for name, where in _macros(workdir, include_dir, _headers(module)).items():
        constants.setdefault(name, where)
    for name, where in sorted(constants.items()):
        if (h := header(where)) and not name.startswith("_") and name not in names.keys() | omit:
            problems.append(f"{name} ({h}) is not in the module")
    return problems


def check_module(module: ModuleType, include_dir: Path, workdir: Path) -> list[str]:
    """Every difference between `module` and the C headers, as readable lines."""
    from elftools.elf.elffile import ELFFile

    checks, records, names, problems = collect(module)
    headers = _headers(module)
    binary, compiled, compile_problems = _compile(workdir, include_dir, headers, checks)
    problems += compile_problems
    if binary is None:
        return problems
    run = subprocess.run([str(binary)], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        return [*problems, f"the probe failed (exit {run.returncode}): {run.stderr.strip()}"]
    problems += _compare(compiled, run.stdout)
    with contextlib.ExitStack() as stack:
        elf = ELFFile(stack.enter_context(binary.open("rb")))
        decls = _declarations(elf.get_dwarf_info())
        complete = {str((include_dir / h).resolve()) for h in _complete_headers(module)}
        for cls in records:
            found = decls.records.get(_c_type(cls))
            if found is not None:
                strict = bool(found[1]) and str(Path(found[1]).resolve()) in complete
                problems += _missing_members(cls, found[0], _c_type(cls), strict)
        problems += _completeness(module, include_dir, workdir, decls, records, names)
    return problems
