"""The lab: QEMU (TCG) with the lab kernel, an emulated IOMMU, VFIO devices and nested KVM.

`pyvmm lab run -- CMD` runs a command there; tests marked `@pytest.mark.lab` run there from a
plain `pytest`. See README.md beside this file.
"""
