"""Config dataclasses + command-line overrides.

Each script's defaults live in `configs/<script>.py` as a dataclass. Any field can be
overridden from the command line as `--field=value` or `--field value`; values are parsed
to the field's declared type. An unknown field is an error that lists the valid ones.
"""
import dataclasses
import inspect
import re
import sys
import types
import typing

from utils.errors import UserError


class ConfigError(UserError, ValueError):
    """A config field that does not parse or validate."""


def _parse_bool(text):
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def parse_value(text: str, tp):
    """Parse `text` into type `tp` (bool, int, float, str, Optional[...], tuple/list[...])."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        if text.strip().lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return parse_value(text, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin in (tuple, list):
        items = [t for t in text.strip().strip("()[]").split(",") if t.strip() != ""]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values, got {len(items)}")
            return tuple(parse_value(t, a) for t, a in zip(items, args))
        elem = args[0] if args else str
        values = [parse_value(t, elem) for t in items]
        return tuple(values) if origin is tuple else values
    if tp is bool:
        return _parse_bool(text)
    if tp is int:
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)  # allow 1e4
            except ValueError:
                raise ValueError(f"expected an integer, got {text!r}") from None
            if not as_float.is_integer():
                raise ValueError(f"expected an integer, got {text!r}") from None
            return int(as_float)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if tp is str:
        return text.strip()
    if tp is typing.Any:
        return text
    raise ValueError(f"unsupported field type {tp}")


def _type_name(tp):
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def field_comments(cfg_cls) -> dict:
    """The comment that documents each field in the config modules (trailing, or the lines above).

    Walks the class hierarchy so a subclass that only changes a default keeps its base's comment.
    """
    docs = {}
    for klass in reversed(cfg_cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update({k: v for k, v in _class_comments(klass).items() if v or k not in docs})
    return docs


def _class_comments(cfg_cls) -> dict:
    try:
        source = inspect.getsource(cfg_cls)
    except (OSError, TypeError):
        return {}
    docs, pending = {}, []
    for line in source.splitlines():
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            text = stripped.lstrip("# ").strip()
            if not text.startswith("---"):  # section headers are for readers of the file, not --help
                pending.append(text)
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", stripped)
        if m and not stripped.startswith(("def ", "class ", "@")):
            docs[m.group(1)] = " ".join(filter(None, pending + [m.group(2) or ""]))
        pending = []
    return docs


def config_help(cfg_cls, prog: str, description: str = "") -> str:
    hints = typing.get_type_hints(cfg_cls)
    defaults = cfg_cls()
    lines = [f"usage: {prog} [--field=value ...]", ""]
    if description:
        lines += [description.strip(), ""]
    lines.append(f"Fields (defaults from configs/{prog.removesuffix('.py')}.py):")
    docs = field_comments(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        doc = docs.get(f.name, "")
        lines.append(f"  --{f.name:<26} {_type_name(hints[f.name])} = {getattr(defaults, f.name)!r}"
                     + (f"  # {doc}" if doc else ""))
    return "\n".join(lines)


def parse_overrides(cfg, argv):
    """Return a copy of dataclass instance `cfg` with `--field=value` overrides applied."""
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --field=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
            value = argv[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        if key not in names:
            raise ConfigError(f"unknown config field --{key}; valid fields: {', '.join(names)}")
        try:
            changes[key] = parse_value(value, hints[key])
        except ValueError as e:
            raise ConfigError(f"--{key}={value}: {e} (field type {_type_name(hints[key])})") from None
    return dataclasses.replace(cfg, **changes)


def load_config(cfg_cls, argv=None, prog=None, description=""):
    """Defaults of `cfg_cls` + command-line overrides; prints help or a one-line error and exits."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or sys.argv[0].rsplit("/", 1)[-1]
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(cfg_cls, prog, description))
        sys.exit(0)
    try:
        cfg = parse_overrides(cfg_cls(), argv)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    return cfg
