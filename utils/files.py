"""Writing outputs so that nothing is ever left half-written under its final name."""
import contextlib
import os
import shutil
import uuid

from utils.errors import UserError


class OutputExistsError(UserError, FileExistsError):
    """The output exists and --overwrite was not given."""


def check_output_dir(path, overwrite: bool, what="output"):
    """Refuse an existing, non-empty output unless --overwrite was given."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise OutputExistsError(f"{what} {path} already exists; pass --overwrite to replace it or choose another path")


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
        shutil.rmtree(old, ignore_errors=True)
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
