"""The engine's exception types.

Every problem with what a user supplied (a file, an array, a model name, a
setting) raises :class:`BadInputError` with a one-line message that says what
is wrong and, where possible, what to do. Fronts (CLI, docks) show that line;
anything else escaping the engine is a bug.
"""


class BadInputError(ValueError):
    """Bad input: unreadable or unsupported data, a bad model file or setting."""


class Cancelled(RuntimeError):
    """The caller's progress callback asked to stop."""
