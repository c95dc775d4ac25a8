"""Bad input gets a 4xx with OpenAI's error body and the server lives on; a full queue answers 503;
a client that goes away stops its generation (the model is held at a gate, so none of it is a race)."""
import threading

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def server(live_server, tiny_ckpt):
    return live_server(["--checkpoint", tiny_ckpt, "--api_key", "sesame"])


def post(server, path, body=None, content=None, key="sesame"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=60)


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err["message"]


USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body, param", [
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "max_tokens": "5"}, "max_tokens"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, None),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, None),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, "messages"),
    ({"messages": USER, "temperature": -1}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "top_k": -5}, "top_k"),
    ({"messages": USER, "n": 2}, "n"),
    ({"messages": USER, "logprobs": True}, "logprobs"),
    ({"messages": USER, "seed": 2 ** 70}, "seed"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": USER, "stream": True, "max_tokens": 1000}, "max_tokens"),  # a JSON 400, not a stream
])
def test_bad_chat_requests_are_400(server, body, param):
    message = assert_error(post(server, "/v1/chat/completions", body), 400, param)
    if param:
        assert param in message


def test_bad_json_is_400_and_any_content_type_is_read_as_json(server):
    r = post(server, "/v1/chat/completions", content=b'{"messages": [')
    assert "not valid JSON" in assert_error(r, 400)
    # curl -d sends application/x-www-form-urlencoded: the body is still the JSON request
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "Hi", "max_tokens": 2}',
                   headers={"Authorization": "Bearer sesame", "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_fields_the_api_does_not_define_are_ignored(server):
    r = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 2, "vendor_extra": {"x": [1]}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_bad_completion_requests_are_400(server):
    assert_error(post(server, "/v1/completions", {"prompt": 5}), 400, "prompt")
    assert_error(post(server, "/v1/completions", {"prompt": [1, 2, 10 ** 6]}), 400, "prompt")
    assert_error(post(server, "/v1/completions", {"prompt": ["a", "b"]}), 400, "prompt")
    assert_error(post(server, "/v1/completions", {"prompt": "a", "echo": True}), 400, "echo")


def test_context_limits_are_400(server):
    # block_size 128: " the" is one token, so 200 of them overflow the context on their own
    assert_error(post(server, "/v1/completions", {"prompt": " the" * 200}), 400, "prompt", "context_length_exceeded")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": " the" * 200}]}),
                 400, "messages", "context_length_exceeded")
    message = assert_error(post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 128}), 400,
                           "max_tokens", "context_length_exceeded")
    assert "129" in message  # 1 prompt token + 128: one more than the context holds
    assert post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 127}).status_code == 200


def test_keys_and_names(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model="tiny", messages=USER)
    assert e.value.body["code"] == "invalid_api_key"
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    good = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        good.chat.completions.create(model="gpt-4", messages=USER)
    assert e.value.body["code"] == "model_not_found"
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed to see it is up
    assert good.chat.completions.create(model="tiny", messages=USER, max_tokens=3).usage.completion_tokens == 3


def test_full_queue_is_503_and_disconnects_stop_generation(live_server, tiny_ckpt):
    server = live_server(["--checkpoint", tiny_ckpt, "--max_queue", "1"], gate=True)
    gate = server.gate
    body = {"prompt": "The king", "max_tokens": 100, "temperature": 0}

    # A streams and runs (held at the gate after 3 forwards); B waits in the queue; C finds it full.
    a = httpx.Client(timeout=60).stream("POST", server.url + "/v1/completions", json={**body, "stream": True})
    gate.open(3)
    a_response = a.__enter__()
    lines = a_response.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    assert '"text"' in first
    server.wait(lambda: server.queue.stats()["running"] == 1, what="A running")
    b_result = {}
    b = threading.Thread(target=lambda: b_result.update(r=httpx.post(server.url + "/v1/completions",
                                                                       json={**body, "max_tokens": 5}, timeout=60)))
    b.start()
    server.wait(lambda: server.queue.stats()["waiting"] == 1, what="B waiting")
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert_error(r, 503, code="server_busy")
    assert r.headers["retry-after"] == "1"

    # A's client goes away: A is cancelled, and stops at its next token once the gate opens.
    a.__exit__(None, None, None)
    job_a = server.jobs[0]
    server.wait(job_a.cancelled.is_set, what="A cancelled")
    passed = gate.passed
    gate.open()
    b.join(timeout=60)
    assert b_result["r"].status_code == 200 and b_result["r"].json()["usage"]["completion_tokens"] == 5
    server.wait(server.idle, what="idle")
    assert job_a.new_tokens <= passed + 1 < 100

    # A non-streamed request whose client leaves while it runs stops too.
    gate.permits = threading.Semaphore(0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=2.0)
    job = server.jobs[-1]
    server.wait(job.cancelled.is_set, what="the non-streamed job cancelled")
    passed = gate.passed
    gate.open()
    server.wait(server.idle, what="idle")
    assert job.new_tokens <= passed + 1 < 100

    # A waiting request whose client leaves is never generated.
    gate.permits = threading.Semaphore(0)
    runner = threading.Thread(target=lambda: httpx.post(server.url + "/v1/completions",
                                                        json={**body, "max_tokens": 5}, timeout=60))
    runner.start()
    server.wait(lambda: server.queue.stats()["running"] == 1, what="running")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)  # waits, then its client leaves
    waiting_job = server.jobs[-1]
    server.wait(waiting_job.cancelled.is_set, what="the waiting job cancelled")
    running_job = server.jobs[-2]
    gate.open()
    runner.join(timeout=60)
    server.wait(server.idle, what="idle")
    assert running_job.new_tokens == 5 and waiting_job.new_tokens == 0


def test_a_failing_generation_is_a_500_and_the_server_lives_on(live_server, tiny_ckpt):
    server = live_server(["--checkpoint", tiny_ckpt])
    forward = server.model.forward

    def broken(*args, **kwargs):
        raise RuntimeError("deliberately broken forward")
    server.model.forward = broken
    try:
        message = assert_error(post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 3}, key=None), 500)
        assert "deliberately broken" in message
        with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "Hi", "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and "deliberately broken" in events[-2] and events[-1] == "data: [DONE]"
    finally:
        server.model.forward = forward
    assert post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 3}, key=None).status_code == 200
