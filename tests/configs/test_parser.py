from dataclasses import dataclass

import pytest

from configs.parser import ConfigError, config_help, load_config, parse_overrides


@dataclass
class DemoConfig:
    model_type: str = "gpt2-tiny"  # a model preset
    max_train_iters: int = 10
    max_lr: float = 4e-4
    mixed_precision: bool = True
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    datasources: tuple[str, ...] = ()
    resume: str | None = None


def test_types_are_parsed():
    cfg = parse_overrides(DemoConfig(), [
        "--max_train_iters=1e3", "--max_lr", "3e-4", "--mixed_precision=false",
        "--adamw_betas=0.8,0.99", "--datasources", "a:0.6,b:0.4", "--resume=none", "--model_type=gpt2",
    ])
    assert cfg.max_train_iters == 1000 and isinstance(cfg.max_train_iters, int)
    assert cfg.max_lr == 3e-4 and cfg.mixed_precision is False
    assert cfg.adamw_betas == (0.8, 0.99) and cfg.datasources == ("a:0.6", "b:0.4")
    assert cfg.resume is None and cfg.model_type == "gpt2"
    assert parse_overrides(DemoConfig(), ["--resume", "auto"]).resume == "auto"


def test_unknown_field_lists_valid_ones():
    with pytest.raises(ConfigError,
                       match=r"unknown config field --max_iters; valid fields: model_type, max_train_iters"):
        parse_overrides(DemoConfig(), ["--max_iters=5"])


@pytest.mark.parametrize("arg, msg", [
    ("--max_train_iters=ten", "expected an integer"), ("--max_train_iters=1.5", "expected an integer"),
    ("--mixed_precision=maybe", "expected true/false"), ("--adamw_betas=0.9", "expected 2 comma-separated"),
    ("--max_lr=fast", "expected a number"),
])
def test_bad_values_name_the_field(arg, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parse_overrides(DemoConfig(), [arg])
    assert arg.split("=")[0] in str(e.value)


def test_missing_value_and_positional():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(DemoConfig(), ["--max_lr"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(DemoConfig(), ["max_lr=3"])


def test_help_lists_fields_types_defaults_and_comments(capsys):
    text = config_help(DemoConfig, "demo.py")
    assert "--max_lr" in text and "float = 0.0004" in text and "# a model preset" in text
    with pytest.raises(SystemExit) as e:
        load_config(DemoConfig, ["--help"], prog="demo.py")
    assert e.value.code == 0 and "--adamw_betas" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        load_config(DemoConfig, ["--nope=1"], prog="demo.py")
    assert e.value.code == 2 and "demo.py: error: unknown config field --nope" in capsys.readouterr().err
