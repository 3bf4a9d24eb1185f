"""The engine's exception types.

Every problem with what a user supplied (a file, an array, a model name, a
setting) raises :class:`BadInputError` with a one-line message that says what
is wrong and, where possible, what to do. Fronts (CLI, docks) show that line;
anything else escaping the engine is a bug.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: object) -> str:
    """``text`` with control characters (newlines included) escaped: always one line.

    File names and model descriptions may hold newlines; a message or a
    listing that quotes them must still be one line each.
    """
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), str(text).strip())


class BadInputError(ValueError):
    """Bad input: unreadable or unsupported data, a bad model file or setting.

    The message is always one line (control characters are escaped).
    """

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(one_line(message), *args)


class Cancelled(RuntimeError):
    """The caller's progress callback asked to stop."""
