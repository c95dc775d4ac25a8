"""What every script shares on the command line: the runner that turns a user error into one line
`script.py: error: ...` with exit code 2 (argparse's), stderr logging, and common flags."""
import argparse
import os
import sys

from utils.errors import USER_ERRORS, UserError, record_for_torchrun, user_message


class UsageError(UserError, ValueError):
    """Bad input from the command line or stdin that the user can fix."""


def fail(prog, message):
    line = f"{prog}: error: {message}"
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: one says it
        print(line, file=sys.stderr, flush=True)
    record_for_torchrun(line)
    sys.exit(2)


def run(prog, main, argv=None):
    """Call main(argv); a user error ends the program with one line and exit code 2, no traceback."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        fail(prog, user_message(e))
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; nothing was written under the output name", file=sys.stderr)
        sys.exit(130)


def log(msg):
    """Progress and notes go to stderr, so that stdout holds only a script's output."""
    print(msg, file=sys.stderr, flush=True)


def parser(prog, description):
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output_flags(p):
    p.add_argument("--output", required=True, metavar="DIR",
                   help="output directory (written to a temporary name, renamed when complete)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it is this script's own earlier output (never another directory)")


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def fraction(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000


def dir_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))
