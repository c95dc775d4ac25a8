"""The README's code map mirrors the tree: every source file is listed, and every listed file exists."""
import os
import re
import subprocess

import pytest


def test_code_map_lists_every_source_file(repo):
    with open(os.path.join(repo, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("\n## Code map", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))
    try:
        tracked = subprocess.check_output(["git", "ls-files", "*.py", "*.sh"], cwd=repo, text=True).split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    sources = {f for f in tracked if not f.startswith(("tests/", ".ci/")) and not f.endswith("__init__.py")}
    assert sources - listed == set(), "files missing from the README's code map"
    assert listed - sources == set(), "the README's code map lists files that do not exist"
