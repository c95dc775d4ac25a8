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


# ----------------------------------------------------------------- edited config modules

def edited_config(tmp_path, module, old, new):
    """configs/<module>.py with one edit, imported from a file (as the script would import it)."""
    import importlib.util
    import os
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(repo, "configs", f"{module}.py"), encoding="utf-8") as f:
        text = f.read()
    assert old in text
    path = tmp_path / f"edited_{module}.py"
    path.write_text(text.replace(old, new), encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"edited_{module}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # as an import does (inspect finds the source through it)
    spec.loader.exec_module(mod)
    cls = [v for k, v in vars(mod).items() if k.endswith("Config") and v.__module__ == mod.__name__][0]
    return cls, path


def one_line_exit(capsys, cls, argv=()):
    with pytest.raises(SystemExit) as e:
        load_config(cls, list(argv), prog="pretrain.py")
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("pretrain.py: error: "), err
    return lines[0]


@pytest.mark.parametrize("module, old, new, fragments", [
    ("pretrain", "max_train_iters: int = 100_000", 'max_train_iters: int = "100k"',
     ["max_train_iters = '100k' is not an int", "write an int"]),
    ("pretrain", "max_train_iters: int = 100_000", 'max_train_iters: int = "100000"',
     ["write 100000 (no quotes)"]),
    ("pretrain", "warmup_steps: int = 2000", "max_lr: float = 1\n    warmup_steps: int = 2000", []),  # int is float
    ("pretrain", "warmup_steps: int = 2000", "warmup_step: int = 2000",
     ["warmup_step is not a config field", "did you mean warmup_steps?"]),
    ("pretrain", "warmup_steps: int = 2000", "warmup_iters: int = 2000", ["did you mean warmup_steps?"]),
    ("pretrain", "max_train_iters: int = 100_000", 'max_train_iters: str = "100k"',
     ["max_train_iters is declared str; TrainingConfig declares it int"]),
    ("finetune", "num_epochs: int = 2", "num_epoch: int = 2", ["did you mean num_epochs?"]),
    ("finetune", "max_lr: float = 3e-5", "max_lr: float = (3e-5,)", ["max_lr = (3e-05,) is not a float"]),
    ("finetune_lora", 'lora_targets: tuple[str, ...] = ("q", "v")', 'lora_targets: tuple[str, ...] = "q,v"',
     ["lora_targets = 'q,v' is not a tuple[str, ...]", "write ('q', 'v') (no quotes)"]),
    ("finetune_lora", "train_bias: bool = False", 'train_bias: bool = "false"', ["write False (no quotes)"]),
    ("finetune_lora", "lora_alpha: float = 32.0", "lora_alhpa: float = 32.0", []),  # lora_alpha gone: see below
])
def test_edited_config_mistakes_are_one_line(tmp_path, capsys, module, old, new, fragments):
    cls, path = edited_config(tmp_path, module, old, new)
    if not fragments:  # a valid edit: loads
        if "lora_alhpa" in new:
            line = one_line_exit(capsys, cls)
            assert "lora_alhpa is not a config field" in line and "did you mean lora_alpha?" in line
        else:
            assert load_config(cls, [], prog="pretrain.py").max_lr == 1
        return
    line = one_line_exit(capsys, cls, ["--help"])  # before --help too: its defaults would be wrong
    lineno = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if new.split("\n")[0] in text)
    assert f"{path.name}:{lineno}: " in line, line
    for fragment in fragments:
        assert fragment in line, line


def test_the_shipped_configs_pass_the_check():
    from configs.finetune import FinetuneConfig
    from configs.finetune_lora import FinetuneLoRAConfig
    from configs.parser import check_config_class
    from configs.pretrain import PretrainConfig
    for cls in (PretrainConfig, FinetuneConfig, FinetuneLoRAConfig, DemoConfig):
        check_config_class(cls)


@pytest.mark.parametrize("argv, fragment", [
    (["--sft_weight=-1"], "--sft_weight must be >= 0, got -1.0"),
    (["--beta=0"], "--beta must be > 0"),
    (["--loss_type=ipo", "--label_smoothing=0.1"], "--label_smoothing applies to --loss_type=sigmoid only"),
])
def test_dpo_settings_out_of_range_are_one_line(capsys, argv, fragment):
    from configs.finetune_dpo import FinetuneDPOConfig
    assert fragment in one_line_exit(capsys, FinetuneDPOConfig, argv)
