"""The code map (docs/code-map.md, linked from the README) mirrors the tree: every source file is listed,
and every listed file exists."""
import os
import re
import subprocess

import pytest


def test_code_map_lists_every_source_file(repo):
    with open(os.path.join(repo, "docs", "code-map.md"), encoding="utf-8") as f:
        code_map = f.read()
    listed = set(re.findall(r"^\| `([^`]+)` \|", code_map, flags=re.M))
    try:
        tracked = subprocess.check_output(["git", "ls-files", "*.py", "*.sh"], cwd=repo, text=True).split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    sources = {f for f in tracked if not f.startswith(("tests/", ".ci/")) and not f.endswith("__init__.py")}
    assert sources - listed == set(), "files missing from docs/code-map.md"
    assert listed - sources == set(), "docs/code-map.md lists files that do not exist"


def test_links_lead_to_files_that_exist(repo):
    pages = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(repo, "docs")))
                             if f.endswith(".md")]
    missing = []
    for page in pages:
        with open(os.path.join(repo, page), encoding="utf-8") as f:
            targets = re.findall(r"\]\(([^)#]+)\)", f.read())
        if page == "README.md":
            assert "docs/code-map.md" in targets, "the README must link to the code map"
        folder = os.path.dirname(os.path.join(repo, page))
        missing += [f"{page}: {t}" for t in targets if "://" not in t and not os.path.exists(os.path.join(folder, t))]
    assert missing == [], "links to files that do not exist"
