"""Load test of serve.py on loopback: N concurrent streaming clients (the `openai` package), bounded
in requests and time.

    python bench/serve_load.py                                  # random gpt2-tiny, 8 clients x 2 requests
    python bench/serve_load.py --checkpoint out/finetune/final --clients 16 --requests 4 --max_tokens 64

Starts `serve.py` as a user would (a subprocess on 127.0.0.1, a free port), then:
1. asks every prompt once, alone and not streamed, greedy: the expected text of each; alternating
   with the same generation in this process by `utils.generation.streaming.Streamer` (no server),
   which must give the same text: the two rates show what the server adds;
2. lets N clients loose at once, each streaming its own prompts one after another (greedy, the
   same max_tokens), and checks every streamed text against its prompt's expected text: a failed
   request or a text that is not its own ("mixed up") is counted and makes the run fail.
Reported: requests/s over phase 2, and per request time to first token (TTFT: request sent ->
first text chunk) and tokens/s (completion tokens / (last chunk - request sent), as that client
saw it, queueing included) at p50 and p99. Prompts differ in their last words, so their greedy
continuations differ (counted: "distinct_expected_texts") and a mix-up would show. The server
generates one request at a time (utils/serving/queue.py), so with N clients a request waits for up
to N-1 others: TTFT grows with N while requests/s stays the single-stream rate.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import openai

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBJECTS = ["The king", "A small dog", "My brother", "The old woman", "The ship", "Our teacher", "The river",
            "A red apple", "The long road", "His letter", "The morning light", "A quiet song"]
VERBS = ["sees", "loves", "finds", "carries", "follows", "remembers", "leaves", "opens"]
OBJECTS = ["river", "apple", "road", "letter", "light", "song", "garden", "window", "horse", "bread", "candle",
           "mountain", "bridge", "mirror", "coat", "harbour", "lantern", "violin", "forest", "kettle", "island",
           "ladder", "meadow", "pocket", "saddle", "thunder", "tower", "valley", "wagon", "whistle", "anchor",
           "blanket"]


def percentile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def tiny_checkpoint(directory):
    sys.path.insert(0, REPO)
    import torch

    from models.gpt2 import GPT2Config, GPT2LMHeadModel
    from utils.checkpoints.model import save_model
    torch.manual_seed(0)
    path = os.path.join(directory, "gpt2-tiny")
    save_model(GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64)), path)
    return path


def start_server(checkpoint, max_queue, threads):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), "--checkpoint", checkpoint,
                             "--port", "0", "--max_queue", str(max_queue), "--dtype", "float32"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", proc.stderr.readline())
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain the log
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("serve_load.py: error: serve.py did not start")


def direct_generator(checkpoint, max_tokens):
    """prompt -> (text, new tokens, seconds) greedy, with the generation code in this process."""
    sys.path.insert(0, REPO)
    from types import SimpleNamespace

    import torch

    from utils.generation.loading import load_for_generation
    from utils.generation.streaming import Streamer
    from utils.tokenizer import get_tokenizer
    enc = get_tokenizer()
    streamer = Streamer(load_for_generation(checkpoint), SimpleNamespace(
        temperature=0.0, top_k=200, top_p=1.0, repetition_penalty=1.0, max_new_tokens=max_tokens, seed=0,
        dtype="float32"), torch.device("cpu"))

    def generate(prompt):
        r = streamer.run(enc.encode(prompt, allowed_special={"<|endoftext|>"}))
        return r.text, len(r.new_ids), r.seconds
    return generate


def stream_one(client, model, prompt, max_tokens):
    """(text, completion tokens, ttft s, total s) of one streamed greedy completion."""
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].text:
            text.append(chunk.choices[0].text)
            if first is None:
                first = time.perf_counter() - t0
    return "".join(text), usage.completion_tokens, first, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="model checkpoint (default: a random gpt2-tiny built in a temp dir)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600, help="seconds the whole concurrent phase may take")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the server (0: its default)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or tiny_checkpoint(tmp)
        proc, url = start_server(checkpoint, max_queue=args.clients, threads=args.threads)
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=args.timeout)
            for _ in range(200):
                try:
                    model = client.models.list().data[0].id
                    break
                except openai.APIConnectionError:
                    time.sleep(0.1)
            n = args.clients * args.requests
            prompts = [f"{SUBJECTS[i % len(SUBJECTS)]} {VERBS[i % len(VERBS)]} the {OBJECTS[i % len(OBJECTS)]}"
                       for i in range(n)]
            # Phase 1, alternating per prompt: in this process with the generation code itself (no
            # server), then through the server alone; the texts must agree, the rates show the overhead.
            direct = direct_generator(checkpoint, args.max_tokens)
            expected, rates = [], {"direct": [], "server": []}
            direct("Warm up")  # first calls allocate and fill caches: not timed
            client.completions.create(model=model, prompt="Warm up", max_tokens=args.max_tokens, temperature=0)
            for q in prompts:
                text, n_direct, seconds = direct(q)
                rates["direct"].append(n_direct / seconds)
                t0 = time.perf_counter()
                r = client.completions.create(model=model, prompt=q, max_tokens=args.max_tokens, temperature=0)
                rates["server"].append(r.usage.completion_tokens / (time.perf_counter() - t0))
                if r.choices[0].text != text:
                    raise SystemExit(f"serve_load.py: the server's greedy text for {q!r} differs from Streamer's")
                expected.append(text)
            distinct = len(set(expected))

            results, failures = [], []

            def run_client(c):
                own = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=args.timeout)
                for r in range(args.requests):
                    i = c * args.requests + r
                    try:
                        text, tokens, ttft, total = stream_one(own, model, prompts[i], args.max_tokens)
                    except Exception as e:  # counted, reported
                        failures.append(f"request {i}: {type(e).__name__}: {e}")
                        continue
                    if text != expected[i]:
                        failures.append(f"request {i}: mixed up: got {text[:40]!r}, expected {expected[i][:40]!r}")
                    results.append((ttft, tokens / total, tokens))

            t0 = time.perf_counter()
            workers = [threading.Thread(target=run_client, args=(c,), daemon=True) for c in range(args.clients)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(timeout=max(0.0, args.timeout - (time.perf_counter() - t0)))
            wall = time.perf_counter() - t0
            load = os.getloadavg()[0]  # other processes on the machine: the figures' context
            if any(w.is_alive() for w in workers):
                failures.append(f"the concurrent phase did not end within --timeout {args.timeout} s")
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    ttft = [r[0] for r in results]
    rate = [r[1] for r in results]
    figures = {
        "clients": args.clients, "requests": n, "completed": len(results), "failed_or_mixed_up": len(failures),
        "distinct_expected_texts": distinct, "load_average_1min": round(load, 2),
        "max_tokens": args.max_tokens, "wall_s": round(wall, 2),
        "alone_tokens_per_s_direct_median": round(statistics.median(rates["direct"]), 1),
        "alone_tokens_per_s_server_median": round(statistics.median(rates["server"]), 1),
        "requests_per_s": round(len(results) / wall, 3),
        "tokens_per_s_total": round(sum(r[2] for r in results) / wall, 1),
        "ttft_s_p50": round(percentile(ttft, 0.5), 3) if ttft else None,
        "ttft_s_p99": round(percentile(ttft, 0.99), 3) if ttft else None,
        "client_tokens_per_s_p50": round(percentile(rate, 0.5), 2) if rate else None,
        "client_tokens_per_s_p99_slowest": round(percentile(rate, 0.01), 2) if rate else None,
    }
    print(json.dumps(figures, indent=2))
    for f in failures[:10]:
        print("FAILED", f, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if failures:
        raise SystemExit(f"serve_load.py: {len(failures)} failed or mixed-up request(s)")


if __name__ == "__main__":
    main()
