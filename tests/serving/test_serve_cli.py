"""serve.py as a user runs it: a fixable mistake is one line and exit code 2; a real run serves the
openai client, with the key taken from the environment, and stops cleanly on Ctrl+C."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest

pytestmark = pytest.mark.slow  # launches serve.py in subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def serve(*args, env=None):
    proc = subprocess.run([sys.executable, "serve.py", "--dtype", "float32", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**ENV, **(env or {})})
    return proc.returncode, proc.stderr


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("serve.py: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_user_errors_are_one_line_exit_2(tiny_ckpt, tmp_path):
    code, err = serve("--checkpoint", tmp_path / "missing")
    assert code == 2 and "missing" in one_error_line(err)
    code, err = serve("--checkpoint", tiny_ckpt, "--max_queue", -1)
    assert code == 2 and "--max_queue" in one_error_line(err)
    code, err = serve("--checkpoint", tiny_ckpt, "--api_key", "")
    assert code == 2 and "--api_key" in one_error_line(err)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, err = serve("--checkpoint", tiny_ckpt, "--port", taken.getsockname()[1])
    assert code == 2 and "cannot listen" in one_error_line(err)


def test_serves_the_openai_client_with_the_key_from_the_environment(tiny_ckpt):
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", tiny_ckpt, "--dtype", "float32",
                             "--port", "0", "--max_new_tokens", "7"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "MINIGPT_API_KEY": "sesame"})
    try:
        deadline, url = time.time() + 120, None
        while url is None:
            assert time.time() < deadline and proc.poll() is None, "serve.py did not start"
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", proc.stderr.readline())
            url = m and m.group(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0, timeout=60)
        for _ in range(100):  # the line is printed just before uvicorn starts accepting
            try:
                model = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        assert model == os.path.basename(tiny_ckpt)
        r = client.completions.create(model=model, prompt="The king sees")
        assert r.usage.completion_tokens == 7  # the server's --max_new_tokens is the default max_tokens
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        proc.stderr.close()
