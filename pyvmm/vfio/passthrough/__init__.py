"""A host device passed through to the guest as a PCI function:

assign.py      device kind "vfio-pci": the host device checked on sysfs, opened, put on bus 0
function.py    VfioPciFunction: the two halves below put together, and its saved state
config.py      the config-space rules: identity, command, capabilities (PM, Express, MSI, MSI-X)
bars.py        the BARs: the device's mmap in KVM slots, the MSI-X table and PBA trapped
interrupts.py  INTx, MSI and MSI-X as eventfds and irqfds (no interrupt through Python)
"""
