"""Every script, given an input path that does not exist, says so in one line and exits 2: the
contract of DESIGN.md ("script.py: error: ..." on stderr, never a traceback), run as a user runs it."""
import os
import subprocess
import sys

import pytest

MISSING = "no/such/path"

CASES = {
    "make_sample_corpora.py": ["--output", "{tmp}/out", "--wheel_dir", MISSING],
    "prepare_data_pretrain.py": ["--input", MISSING, "--output", "{tmp}/out"],
    "build_pretrain_datasets.py": ["--input", MISSING, "--output", "{tmp}/out"],
    "prepare_data_finetune.py": ["--input", MISSING, "--output", "{tmp}/out"],
    "build_finetune_datasets.py": ["--input", MISSING, "--output", "{tmp}/out"],
    "pretrain.py": ["--model_type=gpt2-tiny", f"--data_dir={MISSING}", "--ckpt_dir={tmp}/ck", "--log_dir={tmp}/runs"],
    "finetune.py": [f"--pretrained_ckpt={MISSING}", f"--data_dir={MISSING}", "--ckpt_dir={tmp}/ck",
                    "--log_dir={tmp}/runs"],
    "finetune_lora.py": [f"--pretrained_ckpt={MISSING}", f"--data_dir={MISSING}", "--ckpt_dir={tmp}/ck",
                         "--log_dir={tmp}/runs"],
    "finetune_dpo.py": [f"--pretrained_ckpt={MISSING}", f"--data_dir={MISSING}", "--ckpt_dir={tmp}/ck",
                        "--log_dir={tmp}/runs"],
    "convert_hf_checkpoint.py": ["--hf_dir", MISSING, "--output", "{tmp}/out"],
    "convert_lora_checkpoint.py": ["--base", MISSING, "--lora", MISSING, "--output", "{tmp}/out"],
    "generate_pretrained.py": ["--checkpoint", MISSING, "--prompt", "Hello"],
    "generate_finetuned.py": ["--checkpoint", MISSING, "--question", "Hello?"],
    "evaluate.py": ["--checkpoint", MISSING, "--tasks", "hellaswag", "--limit", "2"],
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_missing_input_is_one_line_and_exit_2(script, tmp_path, repo):
    args = [a.replace("{tmp}", str(tmp_path)) for a in CASES[script]]
    proc = subprocess.run([sys.executable, os.path.join(repo, script), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": repo}, stdin=subprocess.DEVNULL)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and errors[0].startswith(f"{script}: error: ") and MISSING in errors[0], proc.stderr
    assert lines[-1] == errors[0], proc.stderr  # notes may come first; the error is the last word
    assert not os.path.exists(tmp_path / "out")


def test_each_trainer_refuses_the_other_kind_of_data(tmp_path, run_script, write_finetune_data,
                                                      write_preference_data):
    """finetune.py given preference pairs, finetune_dpo.py given prompt/completion data: one line naming the
    script that takes them."""
    for script, data, other in (("finetune.py", write_preference_data(tmp_path / "pref"), "finetune_dpo.py"),
                                ("finetune_dpo.py", write_finetune_data(tmp_path / "sft"), "finetune.py")):
        proc = run_script(script, f"--data_dir={data}", "--pretrained_ckpt=nowhere", f"--ckpt_dir={tmp_path}/ck",
                          f"--log_dir={tmp_path}/runs", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"{script}: error: --data_dir="), proc.stderr
        assert other in proc.stderr
