"""Errors that mean "the user asked for something we cannot do".

The CLI turns a :class:`UserError` into one line on stderr and exit code 2, with no
traceback. Library callers can catch it like any other exception. Everything else that
escapes is a bug in sharpscope and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: the message says what is wrong and how to fix it."""
