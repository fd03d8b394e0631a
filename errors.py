"""The one error type of the project, at the bottom of the import tree so that every module can raise it.

A UserError is bad input from the user (a flag, a file, a data set): it is printed as one line, `error: ...`, naming
the problem and the fix, with no traceback. Everything else is a bug and keeps its traceback.
"""
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line (`error: ...`) with no traceback."""


def _excepthook(kind, value, tb):
    if issubclass(kind, UserError):
        print(f"error: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


sys.excepthook = _excepthook  # every script that imports this module gets one-line errors for UserError
