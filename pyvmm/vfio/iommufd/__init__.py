"""The iommufd backend and its object model (the kernel's Documentation/userspace-api/iommufd.rst):

objects.py   /dev/iommu, its object registry, IOAS, VFIO device cdevs bound to it
backend.py   the machine's IOMMU context on iommufd (guest RAM mapped by its memfd)
hwpt.py      hardware page tables: paging, nesting parents, nested; dirty bits
viommu.py    vIOMMU and vDEVICE objects;  events.py: vEVENTQ, fault and HW queues
nesting.py   `--viommu nested`: a nesting parent, a vIOMMU and a vDEVICE per device
info.py      IOMMU_GET_HW_INFO decoded (what the IOMMU can: nesting, dirty tracking)
dirty.py     DMA dirty tracking of guest RAM, a source of the machine's dirty log
mock.py      the kernel's iommufd selftest mock (IOMMU_TEST_CMD): devices without hardware
"""
