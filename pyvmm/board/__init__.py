"""The board: the Machine, which wires the machine's building blocks (pyvmm.machine), its
devices (pyvmm.devices) and passed-through functions (pyvmm.vfio) together, and the registry of
device kinds it builds from."""
