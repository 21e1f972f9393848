"""Only what pyproject.toml cannot say: the cffi-built C extension (pyvmm/kvm/exitloop_build.py)."""

from setuptools import setup

setup(cffi_modules=["pyvmm/kvm/exitloop_build.py:ffibuilder"])
