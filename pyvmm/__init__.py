"""pyvmm: a minimal virtual machine monitor in Python on KVM, with VFIO and iommufd passthrough."""

__version__ = "0.1.0"
