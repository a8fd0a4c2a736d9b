"""`python -m adapterops` runs the command line."""

from adapterops.cli import main

main()
