"""The engine's exception types.

Every problem with what a user supplied (a file, an array, a model name, a
setting) raises :class:`BadInputError` with a one-line message that says what
is wrong and, where possible, what to do. Fronts (CLI, docks) show that line;
anything else escaping the engine is a bug.
"""

from __future__ import annotations

import re

#: C0 and C1 controls, DEL, and the characters Unicode treats as line breaks (NEL is C1):
#: any of them in a file name could split "one line per item" output or drive a terminal; and the
#: surrogates that stand for the bytes of a file name that is not valid UTF-8 (they cannot be printed)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: object) -> str:
    """``text`` with control characters and Unicode line separators escaped: always one line.

    File names and model descriptions may hold newlines; a message or a
    listing that quotes them must still be one line each.
    """
    return _CONTROL.sub(_escape, str(text).strip())


def _escape(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return _ESCAPES.get(char) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")


class BadInputError(ValueError):
    """Bad input: unreadable or unsupported data, a bad model file or setting.

    The message is always one line (control characters are escaped).
    """

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(one_line(message), *args)


class Cancelled(RuntimeError):
    """The caller's progress callback asked to stop."""
