"""What the four data scripts share on the command line: flags, errors as one line, a summary."""
import argparse
import os
import sys

from utils.data_io import DataError
from utils.fileio import OutputExistsError


def parser(prog, description):
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return p


def add_output_flags(p):
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (written to a temporary name, renamed when complete)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it already exists")


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


def run(prog, main, argv=None):
    """Call main(args); a bad input ends the program with one line `prog: error: ...`, no traceback."""
    try:
        return main(argv)
    except (DataError, OutputExistsError) as e:
        sys.exit(f"{prog}: error: {e}")
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        sys.exit(f"{prog}: error: {e.strerror or e}{where}")
    except KeyboardInterrupt:
        sys.exit(f"{prog}: interrupted; nothing was written under the output name")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000


def dir_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
