"""The error a user can fix, in a module that imports nothing heavy.

The CLI's entry point catches it before any command has imported torch, so `uvq --help`,
`uvq --version` and a mistyped command answer at once (docs/design.md, "Errors").
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits with status 2."""
