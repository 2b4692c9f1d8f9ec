"""The one exception type that means "the user gave us something wrong".

The CLI turns it into a one-line message and exit code 2; library callers can catch it.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, an invalid option, an unusable dataset."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__
