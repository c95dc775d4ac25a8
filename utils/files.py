"""Writing outputs so that nothing is ever left half-written under its final name."""
import contextlib
import json
import os
import shutil
import uuid
from typing import NamedTuple

from utils.errors import UserError


class OutputExistsError(UserError, FileExistsError):
    """The output exists and may not be replaced, or it overlaps an input."""


class OutputMark(NamedTuple):
    """How a directory that a script wrote is recognised: a file it always holds and what that file says
    (a .json file: `key` present, equal to `value` if given; a text file: its first line is `key`)."""
    file: str
    key: str
    value: object = None

    def on(self, directory) -> bool:
        try:
            with open(os.path.join(directory, self.file), encoding="utf-8") as f:
                if not self.file.endswith(".json"):
                    return f.readline().rstrip("\n") == self.key
                d = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(d, dict) and self.key in d and (self.value is None or d[self.key] == self.value)


def _inside(path, parent) -> bool:
    return path != parent and os.path.commonpath([path, parent]) == parent


def check_apart(output, inputs, flag="--output"):
    """Refuse an output that is an input, sits inside one (a later run would read it back as input) or
    holds one (replacing it would delete the input). Symlinks are resolved."""
    out = os.path.realpath(output)
    for path in inputs:
        if path is None:
            continue
        src = os.path.realpath(path)
        if out == src:
            why = f"is the input {path}: writing it would replace the input; choose another {flag}"
        elif _inside(out, src):
            why = f"is inside the input {path}: a later run would read it back as input; choose a {flag} outside it"
        elif _inside(src, out):
            why = f"holds the input {path}: replacing it would delete the input; choose a {flag} outside it"
        else:
            continue
        raise OutputExistsError(f"{flag} {output} {why}")


def check_output(output, overwrite: bool, mark: OutputMark, inputs=(), what="output directory"):
    """Before any work is done, refuse an output that overlaps an input (check_apart), and an existing one
    unless --overwrite was given and it is this script's own output, recognised by `mark`: --overwrite
    never deletes anything else. An absent or empty directory is fine."""
    check_apart(output, inputs)
    if not os.path.lexists(output) or (os.path.isdir(output) and not os.listdir(output)):
        return
    if not os.path.isdir(output):
        raise OutputExistsError(f"{what} {output} is an existing file, not a directory; "
                                "remove it or choose another path")
    if not mark.on(output):
        raise OutputExistsError(f"{what} {output} already exists and was not written by this script (it has no "
                                f"{mark.file} of ours); --overwrite replaces only this script's own output: "
                                f"choose another path or empty it yourself")
    if not overwrite:
        raise OutputExistsError(f"{what} {output} already exists; pass --overwrite to replace it "
                                "or choose another path")


def _json_with_key(path, key) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(d, dict) and key in d


def check_output_file(output, mark_key: str, inputs=()):
    """The same rules for a script whose --output is one JSON file (evaluate.py): refuse an output that
    overlaps an input (a checkpoint's own files would be replaced), a directory, and an existing file
    unless it is a JSON object holding `mark_key`, i.e. this script's own earlier result."""
    check_apart(output, inputs)
    if os.path.isdir(output):
        raise OutputExistsError(f"--output {output} is a directory; give the path of a file to write")
    if os.path.lexists(output) and not _json_with_key(output, mark_key):
        raise OutputExistsError(f"--output {output} already exists and was not written by this script (no "
                                f"{mark_key!r} in it); choose another path or remove it yourself")


@contextlib.contextmanager
def atomic_dir(path, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it is renamed to `path` in one step.

    On error the temporary directory is removed and any previous `path` is untouched.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def replace_dir(src, dst):
    """Move directory `src` to `dst`, replacing `dst` if it exists (old copy kept until the swap is done)."""
    if os.path.exists(dst):
        old = f"{dst}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
        os.rename(src, dst)
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:  # a file or a link: rmtree refuses those (and ignore_errors used to leave NAME.old-* behind)
            os.remove(old)
    else:
        os.rename(src, dst)


@contextlib.contextmanager
def atomic_file(path, mode="w", **kwargs):
    """Open a temporary sibling of `path` for writing; renamed over `path` on success only."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
