"""`python -m dmgl_cli ...` runs the CLI (used by tests and by workers started as subprocesses)."""

from dmgl_cli.cli import main

main()
