"""`pyvmm` subcommand groups; each module has add_commands(subparsers)."""
