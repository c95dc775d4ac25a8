"""Finding input files and reading records out of them, line-numbered, one bad line at a time.

Readers are generators of `(line, value)` pairs, where `value` is either the record or a
`BadLine` (skipped and reported by the caller, never fatal). Everything streams: a JSON Lines or
text file is read a line at a time, a JSON array an element at a time.

Formats:
  .txt             one document per file, or one per blank-line-separated block (split_paragraphs)
  .jsonl           one JSON value a line (wikiextractor --json: {"id", "url", "title", "text"})
  .json            a JSON array (streamed), one JSON object, or JSON Lines under a .json name
  .yml / .yaml     YAML (chatterbot-corpus)
  wiki_00, wiki_01 wikiextractor output files (no extension): JSON Lines or <doc ...> blocks
Any of these may be compressed as .gz or .bz2.
"""
import bz2
import gzip
import io
import json
import os
import re
from typing import NamedTuple

from utils.errors import UserError
from utils.files import atomic_dir, check_output


class DataError(UserError):
    """A user-facing error; its message is one line saying what is wrong and what to do."""


def output_writer(output, overwrite, mark, inputs=()):
    """Refuse now, before any work is done, an `output` that overlaps an input or exists and may not be
    replaced (utils.files.check_output); return the context manager that later writes it under a
    temporary name and renames it."""
    check_output(output, overwrite, mark, inputs)
    return atomic_dir(output, overwrite=True)  # runs on `with`; absent, empty or ours with --overwrite: checked above


class BadLine(NamedTuple):
    file: str
    line: int
    reason: str

    def as_dict(self):
        return {"file": self.file, "line": self.line, "reason": self.reason}


class BadLines:
    """Counts bad lines and keeps the first `limit` of them (file, line, reason) for the report."""

    def __init__(self, limit=1000):
        self.count, self.examples, self.limit = 0, [], limit

    def add(self, bad):
        self.count += 1
        if len(self.examples) < self.limit:
            self.examples.append(bad if isinstance(bad, dict) else bad.as_dict())

    def warn(self, log, where):
        if self.count:
            first = self.examples[0]
            log(f"warning: {self.count} bad line(s) skipped (first: {first['file']}:{first['line']}: "
                f"{first['reason']}); listed in {where}")


class BadFile(NamedTuple):
    file: str
    reason: str


KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".yml": "yaml", ".yaml": "yaml"}
_WIKIEXTRACTOR_NAME = re.compile(r"wiki_\d+$")
_BINARY_PROBE = 8192


def _strip_compression(name):
    for ext in (".gz", ".bz2"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def file_kind(path):
    """'txt' | 'jsonl' | 'json' | 'yaml' | 'wiki' (sniffed later) | None (not a data file)."""
    name = _strip_compression(os.path.basename(path))
    ext = os.path.splitext(name)[1].lower()
    if ext in KINDS:
        return KINDS[ext]
    if _WIKIEXTRACTOR_NAME.match(name):
        return "wiki"
    return None


def discover_files(paths, kinds, what="input"):
    """Data files under `paths` (files or directories, searched recursively, hidden entries skipped).

    Order: as given, and sorted by path inside a directory, so that runs are reproducible.
    Raises DataError for a missing path, an unsupported file named explicitly, an empty directory.
    """
    wanted = sorted(e for e, k in KINDS.items() if k in kinds)
    wanted_text = "/".join(wanted) + (" or wikiextractor wiki_NN" if "wiki" in kinds else "")
    if not paths:
        raise DataError(f"no {what} given")
    files, seen = [], set()

    def add(path):
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            files.append(path)

    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"{what} {path} does not exist; check the path")
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, n) for n in names if not n.startswith(".") and file_kind(n) in kinds]
            if not found:
                raise DataError(f"{what} directory {path} holds no {wanted_text} files (searched recursively); "
                                f"point --input at the files or at a directory that holds them")
            for f in sorted(found):
                add(f)
        else:
            if file_kind(path) not in kinds:
                raise DataError(f"{what} file {path} is not a {wanted_text} file; rename it or convert it")
            add(path)
    return files


def open_binary(path):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def probe(path):
    """None if `path` looks like text, else a BadFile saying why it cannot be read."""
    try:
        with open_binary(path) as f:
            head = f.read(_BINARY_PROBE)
    except (OSError, EOFError) as e:
        return BadFile(path, f"cannot be read ({e.__class__.__name__}: {e})")
    if not head.strip():
        return BadFile(path, "is empty")
    if b"\x00" in head:
        return BadFile(path, "looks binary (NUL bytes in its first 8 KiB); if it is UTF-16 text, convert it to UTF-8")
    return None


def sniff_wiki(path):
    """wikiextractor writes JSON Lines (--json) or <doc ...> blocks; tell which."""
    with open_binary(path) as f:
        head = f.read(_BINARY_PROBE).lstrip()
    if head.startswith(b"{"):
        return "jsonl"
    if head.startswith(b"<doc"):
        return "wikidoc"
    return "txt"


def _utf8_error(e, line):
    return (f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
            "convert the file to UTF-8 (e.g. iconv -f WINDOWS-1252 -t UTF-8)")


def read_lines(path):
    """(line number, str) for each line (newline kept), or (line number, BadLine) for non-UTF-8 ones."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, BadLine(path, lineno, _utf8_error(e, raw))
                continue
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            yield lineno, line


def _read_text(path):
    """The whole file as text, or a BadLine at the first byte that is not UTF-8."""
    with open_binary(path) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        return BadLine(path, lineno, f"not valid UTF-8 (byte 0x{data[e.start]:02x}); convert the file to UTF-8")


def iter_jsonl(path):
    for lineno, line in read_lines(path):
        if isinstance(line, BadLine):
            yield lineno, line
        elif line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, BadLine(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})")
            except RecursionError:
                yield lineno, BadLine(path, lineno, "malformed JSON (nested too deeply)")


def _iter_json_array(path, f, chunk_chars=1 << 20):
    """Elements of a top-level JSON array, decoded one at a time from text stream `f`."""
    decoder = json.JSONDecoder()
    buf, pos, line, eof = "", 0, 1, False

    def fill():
        nonlocal buf, pos, eof
        more = f.read(chunk_chars)
        eof = not more
        buf = buf[pos:] + more
        pos = 0

    def skip_ws():
        nonlocal pos, line
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                line += buf[pos] == "\n"
                pos += 1
            if pos < len(buf) or eof:
                return
            fill()

    fill()
    skip_ws()
    if pos >= len(buf) or buf[pos] != "[":
        raise AssertionError("caller checked for '['")
    pos += 1
    while True:
        skip_ws()
        if pos >= len(buf):
            yield line, BadLine(path, line, "malformed JSON (the array is not closed with ']')")
            return
        if buf[pos] == "]":
            pos += 1
            skip_ws()
            if pos < len(buf):
                yield line, BadLine(path, line, "malformed JSON (extra data after the closing ']')")
            return
        try:
            obj, end = decoder.raw_decode(buf, pos)
            if end >= len(buf) and not eof:  # a number cut by the chunk end; read on and decode again
                fill()
                continue
        except json.JSONDecodeError as e:
            truncated = e.msg.startswith("Unterminated string") or e.pos >= len(buf) - 1
            if truncated and not eof:
                fill()
                continue
            err_line = line + buf.count("\n", pos, e.pos)
            yield err_line, BadLine(path, err_line, f"malformed JSON ({e.msg}); the rest of this array was skipped")
            return
        except RecursionError:
            yield line, BadLine(path, line, "malformed JSON (nested too deeply); the rest of this array was skipped")
            return
        yield line, obj
        line += buf.count("\n", pos, end)
        pos = end
        skip_ws()
        if pos < len(buf) and buf[pos] == ",":
            pos += 1
        elif not (pos < len(buf) and buf[pos] == "]"):
            yield line, BadLine(path, line, "malformed JSON (expected ',' or ']' between array elements); "
                                            "the rest of this array was skipped")
            return
        if pos > chunk_chars:
            buf, pos = buf[pos:], 0


def iter_json(path):
    """A .json file: array elements one by one; else one whole value; else JSON Lines."""
    with open_binary(path) as raw:
        head = raw.read(_BINARY_PROBE)
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        with open_binary(path) as raw:
            f = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict")
            lineno = 1
            try:
                for lineno, value in _iter_json_array(path, f):
                    yield lineno, value
            except UnicodeDecodeError as e:
                yield lineno, BadLine(path, lineno, f"not valid UTF-8 ({e.reason}) after line {lineno}; "
                                                    "the rest of this file was skipped; convert it to UTF-8")
        return
    text = _read_text(path)
    if isinstance(text, BadLine):
        yield text.line, text
        return
    try:
        yield 1, json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several values: JSON Lines under a .json name
            yield from iter_jsonl(path)
        else:
            yield e.lineno, BadLine(path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})")


def iter_text_docs(path, split_paragraphs=False):
    """Documents of a text file: the whole file, or each block between blank-line runs.

    Yields (first line of the document, text) and (line, BadLine) for non-UTF-8 lines (skipped).
    """
    parts, start = [], None
    for lineno, line in read_lines(path):
        if isinstance(line, BadLine):
            yield lineno, line
            continue
        if split_paragraphs and not line.strip():
            if parts:
                yield start, "".join(parts)
                parts, start = [], None
            continue
        if start is None:
            start = lineno
        parts.append(line)
    if parts:
        yield start, "".join(parts)


_DOC_OPEN = re.compile(r'<doc\b([^>]*)>\s*$')
_ATTR = re.compile(r'(\w+)="([^"]*)"')


def iter_wikidoc(path):
    """wikiextractor's default output: <doc id=".." url=".." title="..">text</doc> blocks."""
    attrs, parts, start = None, [], None
    for lineno, line in read_lines(path):
        if isinstance(line, BadLine):
            yield lineno, line
            continue
        if attrs is None:
            m = _DOC_OPEN.match(line.strip())
            if m:
                attrs, parts, start = dict(_ATTR.findall(m.group(1))), [], lineno
            elif line.strip():
                yield lineno, BadLine(path, lineno, "text outside a <doc> ... </doc> block")
        elif line.strip() == "</doc>":
            yield start, {**attrs, "text": "".join(parts)}
            attrs = None
        else:
            parts.append(line)
    if attrs is not None:
        yield start, BadLine(path, start, "<doc> block not closed with </doc>")


def iter_yaml(path):
    """(line, item) for each item of a YAML file's list ('conversations' for chatterbot), else (1, document)."""
    import yaml
    text = _read_text(path)
    if isinstance(text, BadLine):
        yield text.line, text
        return
    try:
        # BaseLoader: every scalar stays a string (YAML 1.1 would read an answer "Yes" as True)
        loader = yaml.BaseLoader(text)
        try:
            node = loader.get_single_node()
            value = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        lineno = mark.line + 1 if mark else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        yield lineno, BadLine(path, lineno, f"malformed YAML ({problem})")
        return
    items, item_nodes = None, None
    if isinstance(value, list):
        items, item_nodes = value, node.value
    elif isinstance(value, dict) and isinstance(value.get("conversations"), list):
        items = value["conversations"]
        item_nodes = next(v.value for k, v in node.value if getattr(k, "value", None) == "conversations")
    if items is None:
        yield 1, value
        return
    for item, item_node in zip(items, item_nodes):
        yield item_node.start_mark.line + 1, item


def iter_file(path, split_paragraphs=False):
    """(line, record-or-BadLine) for any supported file; text documents come as plain strings."""
    kind = file_kind(path)
    if kind == "wiki":
        kind = sniff_wiki(path)
    if kind == "txt":
        return iter_text_docs(path, split_paragraphs)
    if kind == "jsonl":
        return iter_jsonl(path)
    if kind == "json":
        return iter_json(path)
    if kind == "yaml":
        return iter_yaml(path)
    if kind == "wikidoc":
        return iter_wikidoc(path)
    raise DataError(f"{path}: unsupported file type")


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def jsonl_line(obj) -> str:
    """One output line: compact, non-ASCII kept as is (smaller and readable), keys in a fixed order."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
