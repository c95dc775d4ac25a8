

from utils.data.cleaning import clean_field, clean_text


def test_mojibake_is_repaired():
    assert clean_text("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.") == "The Mona Lisa doesn’t have eyebrows."
    assert clean_text("cafÃ©") == "café"


def test_unicode_is_nfc_normalised():
    assert clean_text("cafe\u0301 ") == "caf\u00e9"


def test_control_characters_and_line_breaks():
    assert clean_text("a\x00b\x07c\r\nd\re\x1bf\x7f") == "abc\nd\nef"
    assert clean_text("page\fbreak") == "page\nbreak"


def test_whitespace_runs():
    text = "  title  \n\n\n\n  indented   line\t\twith  tabs   \nlast  "
    assert clean_text(text) == "title\n\n  indented line with tabs\nlast"


def test_text_is_otherwise_left_alone():
    text = "“Curly” quotes, ＡＢＣ full width, &amp; entities, 日本語, emoji 🤖, <|endoftext|>"
    assert clean_text(text) == text
    assert clean_text("") == "" and clean_text(" \n\t ") == ""


def test_clean_field_keeps_inner_whitespace():
    assert clean_field("  def f():\r\n    return  1\x00  ") == "def f():\n    return  1"

