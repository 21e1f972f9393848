"""For test writers: pyvmm's pytest plugin (`plugin`, registered by the package's pytest11
entry point) and Linux guests that run a shell script (`linux`)."""
