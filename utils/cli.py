"""Command-line errors as one line: `prog: error: ...` on stderr, exit code 2 (argparse's), no traceback."""
import sys

from utils.checkpoint import CheckpointError
from utils.fileio import OutputExistsError
from utils.hf_mapping import HFConversionError


class UsageError(ValueError):
    """Bad input from the command line or stdin that the user can fix."""


USER_ERRORS = (UsageError, CheckpointError, HFConversionError, OutputExistsError, FileNotFoundError, IsADirectoryError)


def fail(prog, message):
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def run(prog, main, argv=None):
    """Call main(argv); a user error ends the program with one line and exit code 2."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        fail(prog, e.strerror + f": {e.filename}" if isinstance(e, OSError) and e.filename and e.strerror else e)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
