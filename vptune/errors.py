"""User-facing errors.

Every mistake a user can make (a bad path, a corrupt file, an unknown name, a bad config value) raises
:class:`VptuneError`. It subclasses :class:`ValueError`, so library callers can catch either; the command
line prints its message on one line and exits with status 2, never with a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class VptuneError(ValueError):
    """A user error with a message that says what was wrong and what would be valid."""


def check_choice(what: str, value: object, choices: Iterable[object]) -> None:
    """Raise :class:`VptuneError` naming the valid choices when ``value`` is not one of ``choices``."""
    options = list(choices)
    if value not in options:
        valid = ", ".join(str(c) for c in options)
        raise VptuneError(f"unknown {what} {value!r}; valid choices: {valid}")
