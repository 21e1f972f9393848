"""`pyvmm kvm info`: what this host's KVM offers."""

from __future__ import annotations

import argparse

from pyvmm.kvm.system import System
from pyvmm.uapi import kvm as uapi


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    kvm = subparsers.add_parser("kvm", help="inspect the host's KVM")
    kvm_sub = kvm.add_subparsers(dest="kvm_command", metavar="SUBCOMMAND", required=True)
    info = kvm_sub.add_parser("info", help="API version, capabilities, CPUID and MSR counts")
    info.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    with System() as kvm:
        print(f"KVM API version {uapi.KVM_API_VERSION}")
        print(f"vcpu mmap size  {kvm.vcpu_mmap_size()}")
        print(f"supported CPUID {len(kvm.supported_cpuid())} entries")
        print(f"MSRs to save    {len(kvm.msr_index_list())}")
        print(f"feature MSRs    {len(kvm.feature_msr_index_list())}")
        print("capabilities:")
        for cap in sorted(uapi.KvmCap, key=lambda c: c.value):
            value = kvm.check_extension(cap)
            print(f"  {cap.name.lower():<28} {value if value else 'no'}")
    return 0
