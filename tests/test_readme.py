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


# ------------------------------------------------------------------- the Python snippets run

def python_snippets(repo):
    """[(page, first line, code)] of every ```python block in README.md and docs/*.md.

    A block right after a line `<!-- snippet not run: why -->` is left out (say why there)."""
    pages = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(repo, "docs")))
                             if f.endswith(".md")]
    snippets = []
    for page in pages:
        with open(os.path.join(repo, page), encoding="utf-8") as f:
            text = f.read()
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S):
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            if not before.startswith("<!-- snippet not run"):
                snippets.append((page, text[:m.start()].count("\n") + 1, m.group(1)))
    return snippets


SNIPPETS = python_snippets(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, write_pretrain_data, write_finetune_data):
    """A directory holding every path the snippets name, made the way a user would have made them."""
    import torch

    from models.gpt2 import GPT2Config, GPT2LMHeadModel
    from utils.checkpoints.hf import export_to_hf
    from utils.checkpoints.model import save_model
    d = tmp_path_factory.mktemp("snippets")
    write_pretrain_data(d / "data" / "pretrain", n_docs=300)
    write_pretrain_data(d / "data" / "wiki", n_docs=300)
    write_finetune_data(d / "data" / "finetune")
    torch.manual_seed(0)
    save_model(GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny")), d / "checkpoints" / "mini" / "final")
    export_to_hf(str(d / "checkpoints" / "mini" / "final"), str(d / "hf" / "my-gpt2"))
    return d


def test_the_pages_have_python_snippets():
    pages = {page for page, _, _ in SNIPPETS}
    assert {"docs/model.md", "docs/data.md", "docs/generation.md"} <= pages
    assert not any("from utils.generation import load_for_generation" in code for _, _, code in SNIPPETS)


@pytest.mark.parametrize("page, line, code", SNIPPETS, ids=[f"{p}:{n}" for p, n, _ in SNIPPETS])
def test_python_snippet_runs(repo, workdir, page, line, code):
    """Each snippet as a user pastes it: a fresh interpreter, in a directory holding the paths it names."""
    import sys
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": repo, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, f"{page}:{line}\n{out.stderr[-3000:]}"


def test_the_readme_virtualenv_is_ignored_by_git(repo):
    with open(os.path.join(repo, "README.md"), encoding="utf-8") as f:
        venv = re.search(r"python3 -m venv (\S+)", f.read()).group(1)
    try:
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{venv}/bin/python"], cwd=repo).returncode == 0
    except OSError:
        pytest.skip("no git")
    if not os.path.isdir(os.path.join(repo, ".git")) and not os.path.isfile(os.path.join(repo, ".git")):
        pytest.skip("not a git checkout")
    assert ignored, f"{venv}/ (the README's virtualenv) is not in .gitignore"


def test_dotted_names_in_the_pages_exist(repo):
    """`utils.generation.loading.load_for_generation` and the like, named in prose: each one imports."""
    import importlib
    names = set()
    for page in ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(repo, "docs"))
                                 if f.endswith(".md")]:
        with open(os.path.join(repo, page), encoding="utf-8") as f:
            names |= {(page, m) for m in re.findall(r"`((?:utils|models|configs|custom_dataset)(?:\.\w+)+)", f.read())
                      if not m.endswith((".py", ".sh", ".md"))}
    assert len(names) >= 3
    missing = []
    for page, name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        else:
            missing.append(f"{page}: {name}")
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                missing.append(f"{page}: {name}")
                break
            obj = getattr(obj, attr)
    assert missing == [], missing
