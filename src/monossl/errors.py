"""The one exception type that means "the user gave us something wrong".

The CLI turns it into a one-line message and exit code 2; library callers can catch it.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, an invalid option, an unusable dataset."""
