"""The exception types the library raises on purpose.

`UserError` means "the user gave us something wrong": the CLI turns it into a one-line message
and exit code 2; library callers can catch it. `TrainingStopped` is a `UserError` raised when a
run cannot go on; table runners catch it to report that row and go on with the others.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, an invalid option, an unusable dataset."""


class TrainingStopped(UserError):
    """Training cannot go on (a loss became NaN or infinite, a BiGAN discriminator won outright);
    the run's last checkpoint is good."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__
