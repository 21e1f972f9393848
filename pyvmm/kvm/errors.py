"""Errors raised by the KVM layer."""

from __future__ import annotations


class KvmError(Exception):
    """A KVM operation failed in a way that is not a single ioctl's errno."""


class KvmUnavailable(KvmError):
    """/dev/kvm cannot be used; the message says why and what to do."""
