"""Moving a machine's state: snapshots to files, restores from them, live migration.

stream.py       the VM state stream: header, typed checksummed sections, END
vmstate.py      a machine's configuration and component states as stream sections
memory_file.py  a snapshot's sparse memory file
snapshot.py     writing, reading and restoring snapshot directories
"""
