"""The one error base class. Every problem a user can fix (a config value, a corpus line, a file,
a busy run directory) is an ``MtError``; the command line prints its message as one line,
``mt: error: MESSAGE``, and exits with status 1. Anything else is a bug and shows its traceback."""

from __future__ import annotations


class MtError(Exception):
    """A user error; the message names the file, line, key or value and what to do."""
