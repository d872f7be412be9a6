"""The ``postdesk`` command."""

from postdesk.cli.main import main

__all__ = ["main"]
