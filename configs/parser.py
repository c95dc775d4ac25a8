"""Config dataclasses + command-line overrides.

Each script's defaults live in `configs/<script>.py` as a dataclass. Any field can be
overridden from the command line as `--field=value` or `--field value`; values are parsed
to the field's declared type. An unknown field is an error that lists the valid ones.

Editing a config module is checked too (`check_config_class`): a default of the wrong type, or a
field that neither the base config nor the script declares (a misspelling would otherwise become a
new field nothing reads, while the real one keeps its default), is one line naming the file and line.
"""
import dataclasses
import difflib
import inspect
import os
import re
import sys
import time
import types
import typing

from utils.errors import UserError, record_for_torchrun


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


def _matches(value, tp) -> bool:
    """Whether a default `value` is of the declared type `tp` (the types parse_value reads)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin in (tuple, list):
        if not isinstance(value, origin):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return tp is typing.Any


def _where(cfg_cls, name) -> str:
    """`configs/pretrain.py:21` for the class in cfg_cls's hierarchy that declares (or sets) `name`."""
    for klass in cfg_cls.__mro__:
        if name in inspect.get_annotations(klass) or name in klass.__dict__:
            try:
                path = inspect.getsourcefile(klass)
                lines, start = inspect.getsourcelines(klass)
            except (OSError, TypeError):
                return klass.__name__
            rel = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
            for i, line in enumerate(lines):
                if re.match(rf"\s*{name}\s*[:=]", line):
                    return f"{rel}:{start + i}"
            return rel
    return cfg_cls.__name__


def check_config_class(cfg_cls):
    """Mistakes made editing a config module, refused before they do harm (ConfigError, one line).

    Valid fields are the base config's (the root dataclass: TrainingConfig for the training scripts)
    plus those a script declares in its class's `own_fields`. Every default must have its field's type,
    and a field keeps the type the base gave it.
    """
    bases = [k for k in cfg_cls.__mro__ if dataclasses.is_dataclass(k)]
    root = bases[-1]
    root_hints = typing.get_type_hints(root)
    valid = [f.name for f in dataclasses.fields(root)]
    for klass in reversed(bases):
        valid += [n for n in klass.__dict__.get("own_fields", ()) if n not in valid]
    hints = typing.get_type_hints(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        if f.name not in valid:
            nearest = difflib.get_close_matches(f.name, valid, n=1, cutoff=0.0)
            raise ConfigError(f"{_where(cfg_cls, f.name)}: {f.name} is not a config field of this script, so "
                              f"nothing would read it; did you mean {nearest[0]}? (a new field must also be "
                              f"listed in the class's own_fields)")
        if f.name in root_hints and hints[f.name] != root_hints[f.name]:
            raise ConfigError(f"{_where(cfg_cls, f.name)}: {f.name} is declared {_type_name(hints[f.name])}; "
                              f"{root.__name__} declares it {_type_name(root_hints[f.name])}: keep that type")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        if not _matches(default, hints[f.name]):
            fix = _a(_type_name(hints[f.name]))
            if isinstance(default, str):
                try:
                    fix = f"{parse_value(default, hints[f.name])!r} (no quotes)"
                except ValueError:
                    pass
            raise ConfigError(f"{_where(cfg_cls, f.name)}: {f.name} = {default!r} is not "
                              f"{_a(_type_name(hints[f.name]))}; write {fix}")


def _a(name):
    return ("an " if name[0] in "aeiou" else "a ") + name


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


def fail(prog, e):
    """One line for a config error (under torchrun: from rank 0, and into torchrun's summary), exit code 2."""
    line = f"{prog}: error: {e}"
    record_for_torchrun(line)
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
    else:  # torchrun stops every rank once one exits: leave rank 0 the time to say it
        time.sleep(5)
    sys.exit(2)


def load_config(cfg_cls, argv=None, prog=None, description=""):
    """Defaults of `cfg_cls` + command-line overrides; prints help or a one-line error and exits."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or sys.argv[0].rsplit("/", 1)[-1]
    try:
        check_config_class(cfg_cls)
    except ConfigError as e:
        fail(prog, e)
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(cfg_cls, prog, description))
        sys.exit(0)
    try:
        cfg = parse_overrides(cfg_cls(), argv)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ConfigError as e:
        fail(prog, e)
    return cfg
