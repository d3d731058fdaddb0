"""The one exception type the CLIs turn into a one-line message and a non-zero exit."""


class MiaError(Exception):
    """A user-facing error: the message names the file or option at fault and how to fix it."""
