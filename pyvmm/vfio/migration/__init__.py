"""VFIO device migration (the v2 uAPI): states.py is the state machine as a graph, device.py
drives one device through it (its flags, its state, its data fd)."""
