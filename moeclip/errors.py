"""The base class of errors a user can fix; the CLI prints their message without a traceback."""


class MoeclipError(Exception):
    """A problem with the user's input or environment, explained in the message."""
