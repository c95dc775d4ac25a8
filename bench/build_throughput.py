"""Benchmark of build_pretrain_datasets.py (not a test).

Generates a corpus of --size_mb MB of cleaned JSON Lines by repeating the sample corpora
(Shakespeare + KJV, cut into ~5 KB documents), then measures on the same text:

  * a single tiktoken process: `encode_ordinary` on every document, encode time only (no I/O);
  * build_pretrain_datasets.py --num_workers N, wall time of the whole command (start-up, reading,
    the val split, writing train.bin/val.bin), with the peak of the summed RSS of the process and
    all its children, sampled every 0.1 s with psutil.

Targets (issue 3): N-worker rate >= 0.8 x N x single-process rate; peak RSS < 1 GB.
Other processes on the machine slow both measurements, so the CPU time of each side is reported
too: tokens per CPU-second of the build (process + workers) over that of the single process
shows the pipeline's own overhead whatever the load.
The corpus and the output live under --workdir and are deleted at the end.

    python bench/build_throughput.py                       # 1 GB corpus, all CPUs
    python bench/build_throughput.py --size_mb 50          # quick run
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from utils.data.sample_corpora import kjv_books, shakespeare_plays  # noqa: E402
from utils.hardware import available_cpus  # noqa: E402
from utils.tokenizer import get_tokenizer  # noqa: E402


def sample_documents(target_chars=5000):
    """The sample corpora cut at blank lines into documents of about `target_chars`."""
    texts = [t for _, t in shakespeare_plays()] + [t for _, _, t in kjv_books()]
    docs = []
    for text in texts:
        cur = ""
        for para in text.split("\n\n"):
            cur = f"{cur}\n\n{para}" if cur else para
            if len(cur) >= target_chars:
                docs.append(cur)
                cur = ""
        if cur:
            docs.append(cur)
    return docs


def write_corpus(out_dir, size_bytes, shard_bytes=256 << 20):
    """JSON Lines shards of repeated sample documents, at least size_bytes in all."""
    lines = [(json.dumps({"text": d}, ensure_ascii=False) + "\n").encode("utf-8") for d in sample_documents()]
    os.makedirs(out_dir)
    written, shard, f, n_docs = 0, 0, None, 0
    while written < size_bytes:
        for line in lines:
            if f is None or f.tell() >= shard_bytes:
                if f:
                    f.close()
                f = open(os.path.join(out_dir, f"shard-{shard:05d}.jsonl"), "wb")
                shard += 1
            f.write(line)
            written += len(line)
            n_docs += 1
            if written >= size_bytes:
                break
    f.close()
    return written, n_docs


def single_process_rate(corpus_dir, limit_bytes):
    """tokens/s of one tiktoken process (encode time only) over the first limit_bytes of the corpus."""
    enc = get_tokenizer()
    tokens, seconds, cpu, read = 0, 0.0, 0.0, 0
    for name in sorted(os.listdir(corpus_dir)):
        with open(os.path.join(corpus_dir, name), "rb") as f:
            for line in f:
                text = json.loads(line)["text"]
                t0, c0 = time.perf_counter(), time.process_time()
                tokens += len(enc.encode_ordinary(text)) + 1  # + EOT, as in the build
                seconds += time.perf_counter() - t0
                cpu += time.process_time() - c0
                read += len(line)
                if read >= limit_bytes:
                    return tokens, seconds, cpu, read
    return tokens, seconds, cpu, read


def run_build(corpus_dir, out_dir, workers):
    """Wall time and peak summed RSS (process + children) of build_pretrain_datasets.py."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, os.path.join(REPO, "build_pretrain_datasets.py"), "--input", corpus_dir,
           "--output", out_dir, "--num_workers", str(workers), "--val_fraction", "0.0005"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        rss = 0
        try:
            for p in [root] + root.children(recursive=True):
                try:
                    rss += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        peak = max(peak, rss)
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the build and its reaped workers
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    err = proc.stderr.read()
    if proc.returncode != 0:
        sys.exit(f"build_pretrain_datasets.py failed:\n{err}")
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    return tokens, seconds, peak, cpu


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size_mb", type=float, default=1024, help="corpus size in MB (2**20 bytes; default 1024)")
    p.add_argument("--num_workers", type=int, default=available_cpus(), help="build workers (default: all CPUs)")
    p.add_argument("--baseline_mb", type=float, default=None,
                   help="measure the single process on the first MB only (default: the whole corpus)")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where the corpus and output go (deleted after)")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="build_bench_", dir=args.workdir)
    try:
        corpus = os.path.join(work, "corpus")
        t0 = time.perf_counter()
        size, n_docs = write_corpus(corpus, int(args.size_mb * 2**20))
        print(f"corpus: {size / 2**20:.0f} MB, {n_docs:,} documents, "
              f"written in {time.perf_counter() - t0:.0f} s", flush=True)

        limit = int(args.baseline_mb * 2**20) if args.baseline_mb else size
        b_tokens, b_seconds, b_cpu, b_bytes = single_process_rate(corpus, limit)
        single, single_cpu = b_tokens / b_seconds, b_tokens / b_cpu
        print(f"single tiktoken process: {b_tokens:,} tokens of {b_bytes / 2**20:.0f} MB in {b_seconds:.1f} s "
              f"= {single:,.0f} tokens/s ({single_cpu:,.0f} tokens per CPU-second)", flush=True)

        load_before = os.getloadavg()[0]
        tokens, seconds, peak, cpu = run_build(corpus, os.path.join(work, "out"), args.num_workers)
        rate = tokens / seconds
        target = 0.8 * args.num_workers * single
        print(f"build_pretrain_datasets.py --num_workers {args.num_workers}: {tokens:,} tokens in {seconds:.1f} s "
              f"= {rate:,.0f} tokens/s, peak RSS {peak / 2**20:.0f} MB; {cpu:.1f} CPU-s = {tokens / cpu:,.0f} "
              f"tokens per CPU-second ({tokens / cpu / single_cpu:.2f} x the single process's); 1-min load average "
              f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other processes share the CPUs)", flush=True)
        print()
        print("| corpus | documents | tokens | 1 tiktoken process (tokens/s) | build, N workers (tokens/s) | "
              "speed-up (target >= 0.8 x N) | tokens per CPU-s, build / single | peak RSS (all processes) |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {size / 2**20:,.0f} MB | {n_docs:,} | {tokens:,} | {single:,.0f} | "
              f"{rate:,.0f} (N={args.num_workers}) | "
              f"{rate / single:.2f}x ({'met' if rate >= target else 'missed'}) | {tokens / cpu / single_cpu:.2f} | "
              f"{peak / 2**20:,.0f} MB ({'< 1 GB' if peak < 2**30 else '>= 1 GB'}) |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
