"""Errors the CLI reports as one line (no traceback): each names the file or field at fault."""


class HerdError(Exception):
    """Bad input from the user: a file, a field, a value."""
