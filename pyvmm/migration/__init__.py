"""Moving a machine's state: snapshots to files, restores from them, live migration.

stream.py            the VM state stream: header, typed checksummed sections, END
machine_sections.py  a machine's configuration and component states as stream sections
memory_file.py       a snapshot's sparse memory file
snapshot.py          writing, reading and restoring snapshot directories
transport.py         a live migration's address, connection and the destination's JSON answers
pages.py             guest RAM as page sections: written by the source, checked by the other end
source.py            pre-copy rounds and the switch-over; convergence.py decides when rounds end
progress.py          what a migration reports: its progress and where its downtime went
destination.py       building, reading and restoring an incoming machine
postcopy.py          post-copy's bookkeeping (pages pending, the fault server);
postcopy_link.py     its push and its receiving end on the migration's connection
sockets.py           the unix sockets pyvmm listens on, and JSON lines
"""
