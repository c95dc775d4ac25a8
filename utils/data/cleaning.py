"""Text cleaning shared by the data-preparation scripts.

`clean_text` does, in order:
  1. mojibake repair and Unicode normalisation (NFC) with ftfy -- skipped for pure-ASCII text,
     which can hold neither (the fast path for most English text);
  2. line breaks: \\r\\n and \\r become \\n (\\f and \\v too);
  3. control characters (C0/C1 except \\n and \\t, DEL) are removed;
  4. whitespace: a run of spaces/tabs inside a line becomes one space, trailing whitespace on a
     line goes, three or more newlines become two (one blank line), the ends are stripped.
     Leading indentation is kept (code and verse rely on it).

Curly quotes, full-width characters and HTML entities are left alone: they are text, not damage.
"""
import re

import ftfy

FTFY_CONFIG = ftfy.TextFixerConfig(
    unescape_html=False,        # "&amp;" in a document about HTML is content
    uncurl_quotes=False,        # ’ is a real character, not damage
    fix_character_width=False,  # full-width punctuation is normal in CJK text
    normalization="NFC",
    explain=False,
)

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_INNER_SPACE = re.compile(r"(?<=\S)[^\S\n]+")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Cleaned `text` (see the module docstring); may be empty."""
    if not text.isascii():
        text = ftfy.fix_text(text, FTFY_CONFIG)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\f", "\n").replace("\v", "\n")
    text = _CONTROL.sub("", text)
    text = _INNER_SPACE.sub(" ", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_RUN.sub("\n\n", text)
    return text.strip()


def clean_field(text: str) -> str:
    """Lighter cleaning for fine-tuning fields: ftfy, line breaks, control characters, stripped ends.

    Inner whitespace is kept: answers may hold code or aligned text.
    """
    if not text.isascii():
        text = ftfy.fix_text(text, FTFY_CONFIG)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text).strip()
