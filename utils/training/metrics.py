"""A run's numbers: speed accounting shared by the training loop and bench/ (model FLOPs and MFU; the
measured matmul peak is utils.hardware.peak_flops), and the run log (metrics.jsonl + TensorBoard).

MFU here is "model FLOPs utilisation" (PaLM, appendix B): the FLOPs the model needs per token
(not what the hardware happens to execute: no recomputation, no vocabulary padding), times
tokens/s, divided by the peak. The peak is *measured* (a large square matmul in the training
dtype), not a datasheet number, so MFU says how close training runs to what matmuls can do here.
"""
import json
import os

from utils.errors import UserError
from utils.files import atomic_file

METRICS_FILE = "metrics.jsonl"


def model_flops_per_token(config, seq_len: int) -> int:
    """Training FLOPs per token of GPT2LMHeadModel: 6·N + 12·L·T·d.

    N counts the weights that take part in matmuls: per block 12·d² (q/k/v, output projection,
    MLP in and out) plus the LM head V·d (tied to wte; vocab_size, not the padded size). Biases,
    LayerNorms and the position embedding add no matmul FLOPs. 6 = 2 (multiply-add) × 3 (forward,
    grad of input, grad of weight). 12·L·T·d are the attention scores and the weighted sum of
    values (2·2·T·d per token per layer forward, ×3 with backward), over the full T×T square as
    PaLM and nanoGPT count it (causal kernels skip half of it, so this slightly flatters MFU).
    """
    L, d, V, T = config.n_layer, config.n_embd, config.vocab_size, seq_len
    n_matmul = L * 12 * d * d + V * d
    return 6 * n_matmul + 12 * L * T * d


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float) -> float:
    """Fraction of the peak that the model's FLOPs reach at this throughput."""
    return tokens_per_sec * flops_per_token / peak if peak else 0.0


class RunLog:
    """A run's metrics: `metrics.jsonl` (every record at full precision) and TensorBoard events, rank 0 only.

    A resumed run continues the log of the run it resumes: records after the checkpoint's step are
    dropped from metrics.jsonl and purged from TensorBoard (from step + 1, so the checkpoint's own step
    stays), and the resumed run writes them again; the result equals an uninterrupted run's log.
    A fresh run into a log_dir that already holds a run's records is refused, like a used ckpt_dir.
    """

    def __init__(self, log_dir, info, start_step: int, resuming: bool, resume_asked: bool = False):
        """resuming: a checkpoint was found to resume from. resume_asked: --resume=auto was given but found
        none, so this run starts fresh: an existing log is refused as without --resume."""
        self.log_dir, self.info, self.start_step = log_dir, info, start_step
        self.path = os.path.join(log_dir, METRICS_FILE)
        self._file = self._writer = None
        self._purge = start_step + 1 if resuming else None
        if not resuming and _records(self.path):
            hint = ("--resume=auto found no checkpoint to continue that run from: choose another --log_dir, or "
                    "the --ckpt_dir that run saved to" if resume_asked else
                    "choose another --log_dir, or --resume=auto to continue that run")
            raise UserError(f"--log_dir={log_dir} already holds the logs of a run ({METRICS_FILE}); {hint}")
        if resuming and info.is_main:
            self._truncate()

    def _truncate(self):
        """Keep the records up to the start step (a run may have logged steps it never saved)."""
        records = _records(self.path)
        kept = [r for r in records if r["step"] <= self.start_step]
        if len(kept) < len(records):
            with atomic_file(self.path) as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            print(f"{self.path}: dropped {len(records) - len(kept)} records after step {self.start_step} "
                  "(a resumed run logs them again)", flush=True)

    def _open(self):
        # Opened at the first record, so that a run refused at start-up leaves no event file behind.
        from torch.utils.tensorboard import SummaryWriter
        os.makedirs(self.log_dir, exist_ok=True)
        self._file = open(self.path, "a")
        self._writer = SummaryWriter(self.log_dir, purge_step=self._purge)

    def _write(self, record, prefix, scalars):
        if not self.info.is_main:
            return
        if self._file is None:
            self._open()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in scalars.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._writer.add_scalar(f"{prefix}/{k}", v, record["step"])

    def train(self, record: dict):
        """One optimizer step's record: {"step", "loss", "lr", ...}; numbers also go to TensorBoard as train/<key>."""
        self._write(record, "train", {k: v for k, v in record.items() if k != "step"})

    def eval(self, step: int, result: dict):
        """An evaluation's {"loss", "perplexity", ...}: metrics.jsonl as eval_<key>, TensorBoard as eval/<key>."""
        self._write({"step": step, **{f"eval_{k}": v for k, v in result.items()}}, "eval", result)

    def close(self):
        if self._file is not None:
            self._writer.close()
            self._file.close()
            self._file = self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(log_dir) -> tuple[dict, dict]:
    """({step: train record}, {step: eval record}) from a run's metrics.jsonl."""
    steps, evals = {}, {}
    for r in _records(os.path.join(log_dir, METRICS_FILE)):
        (evals if "eval_loss" in r else steps)[r["step"]] = r
    return steps, evals


def _records(path) -> list:
    """The records of a metrics.jsonl; a line cut short by a crash is dropped."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records
