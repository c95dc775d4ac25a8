"""The OpenAI-compatible API, driven by the `openai` client: the same greedy answers as the generation
scripts (run as subprocesses, as a user runs them), streamed and not, stop strings, seeds, usage."""
import os
import subprocess
import sys
import threading

import openai
import pytest

from utils.prompt_template import format_prompt
from utils.tokenizer import get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
enc = get_tokenizer()


def script(name, *args, stdin=None):
    proc = subprocess.run([sys.executable, name, "--dtype", "float32", *map(str, args)], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def server(live_server, tiny_ckpt):
    return live_server(["--checkpoint", tiny_ckpt])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, messages, stream=False, **kw):
    """(content, finish_reason, usage) of one chat completion, streamed or not."""
    if not stream:
        r = client.chat.completions.create(model="tiny", messages=messages, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and chunks[-1].usage is not None
    return text, finish[0], chunks[-1].usage


def complete(client, prompt, stream=False, **kw):
    if not stream:
        r = client.completions.create(model="tiny", prompt=prompt, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    chunks = list(client.completions.create(model="tiny", prompt=prompt, stream=True, **kw))
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return "".join(c.choices[0].text for c in chunks if c.choices), finish[0], chunks[-1].usage


def test_models_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    import httpx
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.slow  # runs the generation script in a subprocess
def test_greedy_chat_answer_equals_generate_finetuned(client, tiny_ckpt):
    question, context = "What colour is the boat?", "The boat is green."
    expected = script("generate_finetuned.py", "--checkpoint", tiny_ckpt,
                      "--question", question, "--context", context, "--temperature", 0, "--max_new_tokens", 24)
    messages = [{"role": "system", "content": context}, {"role": "user", "content": question}]
    n_prompt = len(enc.encode_ordinary(format_prompt(question, context)))
    for stream in (False, True):
        text, finish, usage = chat(client, messages, stream=stream, temperature=0, max_tokens=24)
        assert text + "\n" == expected, stream
        assert finish == "length"
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (n_prompt, 24, n_prompt + 24)


@pytest.mark.slow  # runs the generation script in a subprocess
def test_multi_turn_equals_generate_finetuned_stdin(client, tiny_ckpt):
    """generate_finetuned.py keeps earlier turns in the prompt; the chat messages say the same turns."""
    q1, q2 = "Who wrote the letter?", "And who read it?"
    a1_script, a2_script = script("generate_finetuned.py", "--checkpoint", tiny_ckpt, "--temperature", 0,
                                  "--max_new_tokens", 12, stdin=f"{q1}\n{q2}\n").splitlines()
    a1, _, _ = chat(client, [{"role": "user", "content": q1}], temperature=0, max_tokens=12)
    a2, _, usage = chat(client, [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                                 {"role": "user", "content": q2}], stream=True, temperature=0, max_tokens=12)
    assert (a1, a2) == (a1_script, a2_script)
    assert usage.prompt_tokens == len(enc.encode_ordinary(format_prompt(q2, None, [(q1, a1)])))


@pytest.mark.slow  # runs the generation script in a subprocess
def test_greedy_completion_equals_generate_pretrained(client, tiny_ckpt):
    prompt = "The king sees the river"
    out = script("generate_pretrained.py", "--checkpoint", tiny_ckpt, "--prompt", prompt,
                 "--temperature", 0, "--max_new_tokens", 20)
    assert out.startswith(prompt)
    for stream in (False, True):
        text, finish, usage = complete(client, prompt, stream=stream, temperature=0, max_tokens=20)
        assert prompt + text + "\n" == out
        assert finish == "length" and usage.completion_tokens == 20
    # token ids as the prompt: the same continuation
    assert complete(client, enc.encode(prompt), temperature=0, max_tokens=20)[0] == out[len(prompt):-1]


def test_stop_strings_cut_the_text(client):
    prompt = "Our teacher follows"
    full, _, _ = complete(client, prompt, temperature=0, max_tokens=30)
    stop = full[10:14]  # four characters from the middle: usually across a token boundary
    expected = full[:full.find(stop)]
    for stream in (False, True):
        text, finish, usage = complete(client, prompt, stream=stream, temperature=0, max_tokens=30,
                                       stop=["never appears \u2603", stop])
        assert (text, finish) == (expected, "stop")
        assert usage.completion_tokens < 30


@pytest.mark.slow  # runs the generation script in a subprocess
def test_seed_reproduces_generate_finetuned(client, tiny_ckpt):
    question = "Where is the ship?"
    expected = script("generate_finetuned.py", "--checkpoint", tiny_ckpt, "--question", question,
                      "--temperature", 1.0, "--top_k", 0, "--seed", 7, "--max_new_tokens", 16)
    kw = dict(temperature=1.0, max_tokens=16, seed=7, extra_body={"top_k": 0})
    a, _, _ = chat(client, [{"role": "user", "content": question}], **kw)
    b, _, _ = chat(client, [{"role": "user", "content": question}], stream=True, **kw)
    c, _, _ = chat(client, [{"role": "user", "content": question}], **{**kw, "seed": 8})
    assert a + "\n" == expected and a == b and c != a


def test_concurrent_requests_are_not_mixed_up(client):
    prompts = ["The king sees", "A small dog loves", "My brother finds", "The ship carries"]
    serial = [complete(client, p, temperature=0, max_tokens=16)[0] for p in prompts]
    assert len(set(serial)) == len(serial)  # different prompts, different texts: a mix-up would show
    answers = [None] * len(prompts)

    def ask(i):
        answers[i] = complete(client, prompts[i], stream=i % 2 == 0, temperature=0, max_tokens=16)[0]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == serial


def test_stream_include_usage_is_openai_shaped(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 stream=True, stream_options={"include_usage": True},
                                                 max_tokens=5))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])

