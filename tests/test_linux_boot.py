"""Linux boot paths on the host: bzImage and PVH vmlinux, ACPI tables, zero page, errors.

This host's KVM emulates non-PVM guests instruction by instruction, so a kernel does not finish
booting here (that is the lab's job, tests/lab). But the early kernel does run: the bzImage's
decompressor starts from our zero page, and a PVH vmlinux gets far enough to report what it
found in our e820 map, ACPI tables and start info. Those reports are what these tests check.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from guestbuild import requires_kvm
from linuxkernel import lab_kernel, lab_vmlinux

from pyvmm.board.machine import Machine, StopReason
from pyvmm.errors import BootError
from pyvmm.machine import acpi, boot, bzimage, layout
from pyvmm.machine.console import CaptureConsole
from pyvmm.machine.memory import GuestMemory, GuestMemoryError, RamRegion

MiB = layout.MiB
PCI_WINDOWS = ((0xC000_0000, 0xE000_0000), (0x10_0000_0000, 1 << 40))
CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr pyvmm.test=1"


def run_until(machine: Machine, pattern: str, timeout: float) -> str:
    """Run until the console shows `pattern`, then stop; returns the console text."""
    console = machine.console
    assert isinstance(console, CaptureConsole)
    failure: list[BaseException] = []

    def watch() -> None:
        try:
            console.wait_for(pattern, timeout)
        except BaseException as err:
            failure.append(err)
        machine.stop()

    watcher = threading.Thread(target=watch)
    watcher.start()
    machine.run(timeout=timeout + 30)
    watcher.join()
    if failure:
        raise failure[0]
    return console.text


# Host-side checks of what gets written (no KVM).


def make_memory(size: int = 256 * MiB) -> GuestMemory:
    memory = GuestMemory()
    memory.add(RamRegion(0, size))
    return memory


def fake_bzimage(tmp_path: Path, **overrides: int) -> Path:
    """A syntactically valid bzImage header in front of a small 'kernel'."""
    data = bytearray(0x2000)
    data[0xA00:] = bytes(range(256)) * ((0x2000 - 0xA00) // 256)  # the 'kernel' after setup
    fields = {
        "setup_sects": (bzimage.HDR_SETUP_SECTS, "<B", 4),
        "boot_flag": (bzimage.HDR_BOOT_FLAG, "<H", bzimage.BOOT_FLAG),
        "jump": (bzimage.HDR_JUMP, "<H", 0x66EB),
        "version": (bzimage.HDR_VERSION, "<H", 0x020F),
        "loadflags": (bzimage.HDR_LOADFLAGS, "<B", bzimage.LOADFLAG_LOADED_HIGH),
        "initrd_addr_max": (bzimage.HDR_INITRD_ADDR_MAX, "<I", 0x7FFFFFFF),
        "kernel_alignment": (bzimage.HDR_KERNEL_ALIGNMENT, "<I", 0x200000),
        "xloadflags": (bzimage.HDR_XLOADFLAGS, "<H", bzimage.XLF_KERNEL_64),
        "cmdline_size": (bzimage.HDR_CMDLINE_SIZE, "<I", 255),
        "pref_address": (bzimage.HDR_PREF_ADDRESS, "<Q", 0x1000000),
        "init_size": (bzimage.HDR_INIT_SIZE, "<I", 0x400000),
    }
    for name, (offset, fmt, value) in fields.items():
        struct.pack_into(fmt, data, offset, overrides.get(name, value))
    data[bzimage.HDR_HEADER : bzimage.HDR_HEADER + 4] = bzimage.HEADER_MAGIC
    path = tmp_path / "bzImage"
    path.write_bytes(data)
    return path


def test_zero_page_carries_header_cmdline_initrd_e820_and_rsdp(tmp_path: Path) -> None:
    memory = make_memory()
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x07" * 5000)
    image = bzimage.parse_bzimage(str(fake_bzimage(tmp_path)))
    boot = bzimage.load_linux(image, memory, 256 * MiB, "console=ttyS0", str(initrd), 0xE0000)
    assert boot.kernel_address == 0x1000000
    assert boot.entry == 0x1000200
    kernel = (tmp_path / "bzImage").read_bytes()[image.kernel_offset :]
    assert memory.read(boot.kernel_address, len(kernel)) == kernel
    zp = memory.read(layout.ZERO_PAGE, 4096)
    assert zp[bzimage.HDR_BOOT_FLAG : bzimage.HDR_BOOT_FLAG + 2] == b"\x55\xaa"
    assert zp[bzimage.HDR_TYPE_OF_LOADER] == 0xFF
    cmd_ptr = struct.unpack_from("<I", zp, bzimage.HDR_CMD_LINE_PTR)[0]
    assert memory.read(cmd_ptr, 14) == b"console=ttyS0\0"
    rd_addr, rd_size = struct.unpack_from("<II", zp, bzimage.HDR_RAMDISK_IMAGE)
    assert (rd_addr, rd_size) == (boot.initrd_address, 5000)
    assert rd_addr % 4096 == 0 and rd_addr + rd_size <= 256 * MiB
    assert memory.read(rd_addr, 5000) == b"\x07" * 5000
    assert struct.unpack_from("<Q", zp, bzimage.BP_ACPI_RSDP_ADDR)[0] == 0xE0000
    count = zp[bzimage.BP_E820_ENTRIES]
    e820 = [struct.unpack_from("<QQI", zp, bzimage.BP_E820_TABLE + 20 * i) for i in range(count)]
    assert e820 == layout.e820_map(256 * MiB)
    ram = [(a, s) for a, s, t in e820 if t == layout.E820_RAM]
    assert sum(s for _, s in ram) == 256 * MiB - (layout.HIMEM_START - layout.EBDA_START)


def test_fill_from_reads_files_straight_into_ram(tmp_path: Path) -> None:
    memory = make_memory(1 * MiB)
    data = tmp_path / "data"
    data.write_bytes(b"abc" * 1000)
    with data.open("rb") as f:
        assert memory.fill_from(0x1000, f, 3000) == 3000
    assert memory.read(0x1000, 3000) == b"abc" * 1000
    with data.open("rb") as f:  # a short file: fewer bytes, the rest of RAM untouched
        assert memory.fill_from(0x10000, f, 5000) == 3000
    assert memory.read(0x10000 + 3000, 2000) == bytes(2000)
    with data.open("rb") as f, pytest.raises(GuestMemoryError):
        memory.fill_from(1 * MiB - 100, f, 3000)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"boot_flag": 0}, "not a Linux bzImage"),
        ({"version": 0x0206}, "boot protocol 2.6 is too old"),
        ({"xloadflags": 0}, "no 64-bit entry point"),
        ({"loadflags": 0}, "zImage kernels"),
        ({"setup_sects": 60}, "truncated"),
    ],
)
def test_bad_bzimage_headers(tmp_path: Path, overrides: dict[str, int], message: str) -> None:
    with pytest.raises(BootError, match=message):
        bzimage.parse_bzimage(str(fake_bzimage(tmp_path, **overrides)))


def test_kernel_initrd_and_cmdline_must_fit(tmp_path: Path) -> None:
    image = bzimage.parse_bzimage(str(fake_bzimage(tmp_path, init_size=0x3000000)))
    with pytest.raises(BootError, match="give more memory with -m"):
        bzimage.load_linux(image, make_memory(32 * MiB), 32 * MiB, "", None, 0)
    image = bzimage.parse_bzimage(str(fake_bzimage(tmp_path)))
    big = tmp_path / "big.cpio"
    big.write_bytes(bytes(30 * MiB))
    with pytest.raises(BootError, match="does not fit above the kernel"):
        bzimage.load_linux(image, make_memory(48 * MiB), 48 * MiB, "", str(big), 0)
    empty = tmp_path / "empty.cpio"
    empty.write_bytes(b"")
    with pytest.raises(BootError, match="initrd is empty"):
        bzimage.load_linux(image, make_memory(), 256 * MiB, "", str(empty), 0)
    with pytest.raises(BootError, match="accepts at most 255"):
        bzimage.load_linux(image, make_memory(), 256 * MiB, "x" * 300, None, 0)


def test_acpi_tables_have_valid_checksums_and_links() -> None:
    memory = make_memory(16 * MiB)
    tables = acpi.write_tables(memory, vcpus=4, pci_memory=PCI_WINDOWS)
    rsdp = memory.read(tables.rsdp_address, 36)
    assert rsdp.startswith(b"RSD PTR ")
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt_address = struct.unpack_from("<Q", rsdp, 24)[0]
    for name, address in tables.tables.items():
        if name == "RSDP":
            continue
        length = struct.unpack_from("<I", memory.read(address + 4, 4))[0]
        table = memory.read(address, length)
        assert table[:4] == name.encode(), name
        assert sum(table) % 256 == 0, name
    xsdt = memory.read(xsdt_address, 36 + 3 * 8)
    linked = set(struct.unpack_from("<3Q", xsdt, 36))
    assert linked == {tables.tables[n] for n in ("FACP", "APIC", "MCFG")}
    madt = memory.read(tables.tables["APIC"], 200)
    assert madt.count(b"\x00\x08") >= 4  # four processor local APIC entries


def test_acpi_tables_decompile_cleanly_with_iasl(tmp_path: Path) -> None:
    import shutil

    if shutil.which("iasl") is None:
        pytest.fail("iasl (acpica-tools) is needed: run scripts/setup")
    for name, data in (
        ("dsdt", acpi.dsdt(PCI_WINDOWS)),
        ("facp", acpi.fadt(0xE0030)),
        ("apic", acpi.madt(2)),
    ):
        (tmp_path / f"{name}.dat").write_bytes(data)
        result = subprocess.run(
            ["iasl", "-d", f"{name}.dat"], cwd=tmp_path, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert "Device (PCI0)" in dsl and "PNP0A03" in dsl and "Name (\\_S5" in dsl
    assert "Device (RTC)" in dsl and "PNP0B00" in dsl and "0x0070" in dsl
    # both PCI memory windows, the one above 4 GiB as a QWord descriptor
    assert re.search(r"DWordMemory[^)]*0xC0000000, [^)]*0xDFFFFFFF, ", dsl), dsl
    assert re.search(r"QWordMemory[^)]*0x0000001000000000, [^)]*0x000000FFFFFFFFFF, ", dsl), dsl
    assert "Device (COM1)" in dsl and "PNP0501" in dsl
    assert re.search(r"IRQNoFlags \(\)\s*\{4\}", dsl), dsl
    # INTx routing: slot 3's INTB# is GSI 16 + (3 + 2 - 1) % 8 = 20, slot 31's INTD# 16 + 34 % 8
    prt = re.findall(
        r"Package \(0x04\)\s*\{\s*(0x[0-9A-F]+),\s*(\w+),\s*(\w+),\s*(0x[0-9A-F]+)", dsl
    )
    routes = {
        (int(a, 16) >> 16, 0 if p == "Zero" else 1 if p == "One" else int(p, 16)): int(g, 16)
        for a, p, _, g in prt
    }
    assert len(routes) == 128
    assert routes[3, 1] == 20 and routes[31, 3] == 16 + 34 % 8
    facp = (tmp_path / "facp.dsl").read_text()
    assert "Hardware Reduced (V5) : 1" in facp
    assert re.search(r"RTC Century Index : 32", facp), facp


# The real kernel on this host's KVM.


@requires_kvm
@pytest.mark.kvm
def test_a_jump_to_the_reset_vector_resets_the_machine() -> None:
    """A Linux rebooting through the BIOS (its default here: see boot.write_reset_vector) jumps
    to F000:FFF0 in real mode; the code there writes the reset register, and the run ends as a
    reset instead of running through zeroed memory for ever."""
    with Machine(mem_size=16 * MiB, console=CaptureConsole()) as machine:
        boot.write_reset_vector(machine.memory)
        bsp = machine.vcpus[0]
        sregs = bsp.get_sregs()
        sregs.cs.selector, sregs.cs.base = 0xF000, 0xF0000
        bsp.set_sregs(sregs)
        regs = bsp.get_regs()
        regs.rip = 0xFFF0
        bsp.set_regs(regs)
        result = machine.run(timeout=30)
    assert (result.reason, result.exit_code) == (StopReason.RESET, 0), result


@requires_kvm
@pytest.mark.kvm
def test_bzimage_decompressor_starts_from_our_zero_page(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\0" * 4096)
    with Machine(mem_size=256 * MiB, console=CaptureConsole()) as machine:
        machine.load_linux(str(lab_kernel()), str(initrd), CMDLINE)
        text = run_until(machine, "Decompressing Linux", 60)
    assert "early console in extract_kernel" in text
    assert "output: 0x0000000001000000" in text  # loaded where we put it, nokaslr obeyed


@requires_kvm
@pytest.mark.kvm
def test_pvh_vmlinux_reads_e820_acpi_initrd_and_cmdline(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    vmlinux = lab_vmlinux(tmp_path_factory)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\0" * 8192)
    with Machine(mem_size=256 * MiB, vcpus=2, console=CaptureConsole()) as machine:
        boot = machine.load_linux(str(vmlinux), str(initrd), CMDLINE)
        text = run_until(machine, "Kernel command line: ", 120)
    assert "Hypervisor detected: KVM" in text
    assert "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff]  System RAM" in text
    end = boot.initrd_address + 8192 - 1
    assert f"RAMDISK: [mem {boot.initrd_address:#010x}-{end:#010x}]" in text
    for table in ("RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG"):
        assert f"ACPI: {table} " in text, table
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in text
    assert "Allowing 2 present CPUs" in text
    assert "WARNING" not in text


@requires_kvm
@pytest.mark.kvm
def test_cli_kernel_errors_are_one_line(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pyvmm", "run", *args], capture_output=True, text=True
        )

    cases = [
        (("-k", "/etc/hostname"), "not a Linux bzImage"),
        (("-k", str(fake_bzimage(tmp_path)), "-i", str(tmp_path / "missing")), "cannot read"),
        ((), "give one thing to boot"),
        (("guest.elf", "-p", "quiet"), "-i and -p go with a kernel"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.returncode == 1, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
