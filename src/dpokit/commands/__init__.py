"""The command line: argument parsing only; each command builds typed configs and calls the library."""

from dpokit.commands.main import main

__all__ = ["main"]
