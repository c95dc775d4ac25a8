"""The one convention for problems the user can fix: raise a UserError (or a subclass) with a
message that says what is wrong and what to do; `utils.cli.run` (and, under torchrun, the trainer's
process-group wrapper) prints it as one line `script.py: error: ...` and exits with code 2.

Anything else is a bug in miniGPT and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: a bad flag, path, file, config field or checkpoint."""


# The operating system's complaints (a missing path, no permission, a full disk) are just as fixable.
USER_ERRORS = (UserError, OSError)


def user_message(e: BaseException) -> str:
    """One line for a user error; an OSError from a path names the path."""
    if isinstance(e, OSError) and not isinstance(e, UserError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join(str(e).split("\n"))
