"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class MoBiQuantError(Exception):
    """Bad input from the user (a path, a model name, a setting); the message says what to do."""
