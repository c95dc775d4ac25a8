"""What a data directory is, told by the file each data script always writes into its output.

The marks let --overwrite replace only a script's own output, let the build steps refuse an input
that is not the prepare step's output, and let the loaders say what a wrong --data_dir holds.
"""
import collections
import os

from utils.data.readers import DataError
from utils.files import OutputMark

# kind: (mark, what it is, the script that writes it)
KINDS = {
    "pretrain_prepared": (OutputMark("report.json", "documents_out"), "cleaned pretraining text",
                          "prepare_data_pretrain.py"),
    "pretrain_built": (OutputMark("meta.json", "format", "minigpt-pretrain-tokens-v1"), "a built pretraining dataset",
                       "build_pretrain_datasets.py"),
    "finetune_prepared": (OutputMark("report.json", "examples_out"), "prepared fine-tuning examples",
                          "prepare_data_finetune.py"),
    "finetune_built": (OutputMark("meta.json", "format", "minigpt-finetune-tokens-v1"), "a built fine-tuning dataset",
                       "build_finetune_datasets.py"),
}


def mark(kind) -> OutputMark:
    return KINDS[kind][0]


def dataset_kind(directory):
    """The KINDS key of `directory`, or None for anything else (raw data, a missing dir, ...)."""
    if not os.path.isdir(directory):
        return None
    return next((kind for kind, (m, _, _) in KINDS.items() if m.on(directory)), None)


def describe(kind) -> str:
    """'cleaned pretraining text (prepare_data_pretrain.py output)'."""
    _, what, script = KINDS[kind]
    return f"{what} ({script} output)"


def check_build_input(input_dir, kind):
    """Refuse, before any work, a build step's --input that is not what its prepare step writes:
    another kind of data dir, or a dir holding files the build would not read (raw data)."""
    prepared, built = kind, kind.replace("_prepared", "_built")
    prepare_script, build_script = KINDS[prepared][2], KINDS[built][2]
    found = dataset_kind(input_dir)
    if found == built:
        raise DataError(f"--input {input_dir} is already {describe(found)}: train on it with --data_dir={input_dir}")
    if found not in (None, prepared):
        raise DataError(f"--input {input_dir} is {describe(found)}; {build_script} reads {describe(prepared)}")
    if not os.path.isdir(input_dir):
        return
    foreign = []
    for root, dirs, names in os.walk(input_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            plain = name.removesuffix(".gz").removesuffix(".bz2")  # read (or, pretraining, refused with a hint) later
            if name.startswith(".") or plain.endswith(".jsonl") or (root == input_dir and name == mark(prepared).file):
                continue
            foreign.append(os.path.relpath(os.path.join(root, name), input_dir))
    if foreign:
        counts = collections.Counter(os.path.splitext(f)[1] or "extension-less" for f in foreign)
        kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(counts.items()))
        raise DataError(f"--input {input_dir} holds {len(foreign)} file(s) this step would not read ({kinds}: "
                        f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); {build_script} reads the "
                        f".jsonl that {prepare_script} writes: run {prepare_script} --input {input_dir} --output "
                        f"PREPARED_DIR, then build from PREPARED_DIR")


def _built_by_files(names):
    """A built dataset without our meta.json (hand-made, or older), known by its training file."""
    return "pretrain_built" if "train.bin" in names else "finetune_built" if "train.jsonl" in names else None


def not_built_hint(data_dir, stage) -> str:
    """Why `data_dir` is no built `stage` ('pretrain' | 'finetune') dataset, and what to run to make one."""
    d = os.path.normpath(data_dir)
    prepared, built = f"{stage}_prepared", f"{stage}_built"
    prepare_script, build_script = KINDS[prepared][2], KINDS[built][2]
    names = os.listdir(d) if os.path.isdir(d) else []
    kind = dataset_kind(d) or _built_by_files(names)
    if kind == prepared or (kind is None and any(n.endswith(".jsonl") for n in names)):
        what = describe(kind) if kind else ".jsonl files"  # build from it into another directory, never into itself
        return (f"{d} holds {what}, not a built dataset: build it with {build_script} --input {d} "
                f"--output {d}_built, then pass --data_dir={d}_built")
    if kind == built:  # its own kind, with a split file missing (deleted, or a half copy)
        return f"{d} is {describe(built)} with files missing; rebuild it with {build_script}"
    if kind is not None:
        other = "pretrain.py" if stage == "finetune" else "finetune.py or finetune_lora.py"
        return f"{d} is {describe(kind)}, which is for {other}; this run needs {describe(built)}"
    if names:
        return (f"{d} is not {describe(built)}; if it holds raw data, run {prepare_script} --input {d} --output "
                f"{d}_prepared, then {build_script} --input {d}_prepared --output {d}_built, "
                f"and pass --data_dir={d}_built")
    state = "is empty" if os.path.isdir(d) else "does not exist"
    return (f"{d} {state}; run {build_script} --input PREPARED_DIR --output {d} first "
            f"(PREPARED_DIR: {prepare_script} output)")
