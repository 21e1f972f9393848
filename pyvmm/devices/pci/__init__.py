"""PCI: config space and BARs of emulated functions, the bus that assigns BARs, the host bridge."""
