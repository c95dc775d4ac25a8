"""The one convention for problems the user can fix: raise a UserError (or a subclass) with a
message that says what is wrong and what to do; `utils.cli.run` (and, under torchrun, the trainer's
process-group wrapper) prints it as one line `script.py: error: ...` and exits with code 2.

Anything else is a bug in miniGPT and keeps its traceback.
"""
import json
import os
import time


class UserError(Exception):
    """A problem the user can fix: a bad flag, path, file, config field or checkpoint."""


# The operating system's complaints (a missing path, no permission, a full disk) are just as fixable.
USER_ERRORS = (UserError, OSError)


def user_message(e: BaseException) -> str:
    """One line for a user error; an OSError from a path names the path."""
    if isinstance(e, OSError) and not isinstance(e, UserError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join(str(e).split("\n"))


def record_for_torchrun(line: str):
    """Under torchrun, leave the one-line error in this worker's error file, so that torchrun's failure
    summary shows it (as the worker's "traceback") instead of "To enable traceback see: ...".

    The file is the one torch.distributed.elastic.multiprocessing.errors.ErrorHandler.record_exception
    writes (TORCHELASTIC_ERROR_FILE, set by torchrun for each worker), in its JSON shape; ours holds the
    message where it would put a Python traceback. Outside torchrun this does nothing.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:  # the summary then says what it would have said anyway
        pass
