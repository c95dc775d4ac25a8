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
    assert lines == errors, proc.stderr  # inputs are checked first: nothing is printed before the error
    assert not os.path.exists(tmp_path / "out")


TORCHRUN_CASES = {
    "missing data (inside the process group)": (
        ["--model_type=gpt2-tiny", f"--data_dir={MISSING}", "--ckpt_dir={tmp}/ck", "--log_dir={tmp}/runs"],
        f"pretrain.py: error: pretraining data {MISSING}/train.bin not found"),
    "unknown field (before it)": (["--warmup_step=5"], "pretrain.py: error: unknown config field --warmup_step"),
}


@pytest.mark.parametrize("case", sorted(TORCHRUN_CASES))
def test_under_torchrun_the_summary_carries_the_error(case, tmp_path, repo):
    """torchrun's own failure report cannot be silenced from its workers, but its "traceback" lines hold our
    message (through the workers' error files) instead of "To enable traceback see: ..."; rank 0 alone prints."""
    args, message = TORCHRUN_CASES[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(repo, "pretrain.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": repo}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr  # torchrun's code for a failed worker
    printed = [line for line in proc.stderr.splitlines() if line.startswith("pretrain.py: error: ")]
    assert len(printed) == 1 and printed[0].startswith(message), proc.stderr
    root_cause = proc.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert f"  traceback : {printed[0]}\n" in root_cause, proc.stderr
    # Both ranks hit the error and write it; the root cause is the earliest error file. That rank may still be
    # exiting when torchrun stops it for the other rank's exit (its code is then -15, seen once in CI), so the
    # exit code 2 is asserted on the report as a whole, not on the root-cause entry.
    assert "exitcode  : 2 " in proc.stderr and "To enable traceback" not in proc.stderr, proc.stderr

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
