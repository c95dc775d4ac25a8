"""A real server on 127.0.0.1 for the serving tests: serve.py's own argument parsing, model loading,
listening socket and app, run by uvicorn in a thread of the test process (so that a test can hold
the model at a gate, to make "busy" and "disconnected" deterministic, and read what the queue did)."""
import threading
import time

import pytest
import torch
import uvicorn

import serve
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from utils.checkpoints.model import save_model
from utils.serving.app import create_app
from utils.serving.queue import GenerationQueue


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random gpt2-tiny (block 128): its greedy text is varied, so equal answers mean equal computations."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serve") / "tiny"
    save_model(GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64)), path)
    return str(path)


class Gate:
    """Holds the model before each forward pass until the test lets `n` more through (`open(n)`)."""

    def __init__(self, model):
        self.permits = threading.Semaphore(0)
        self.passed = 0
        forward = model.forward

        def gated(*args, **kwargs):
            self.permits.acquire()
            self.passed += 1
            return forward(*args, **kwargs)
        model.forward = gated

    def open(self, n=100_000):
        for _ in range(n):
            self.permits.release()


class LiveServer:
    def __init__(self, argv, gate=False):
        args = serve.parse_args(["--dtype", "float32", "--port", "0", *argv])
        serve.check_serve_args(args)
        sock = serve.listen(args.host, args.port)
        self.model, device = serve.load_model(args)
        self.gate = Gate(self.model) if gate else None
        self.config = serve.server_config(args, self.model)
        self.queue = GenerationQueue(self.model, device, self.config.max_queue)
        self.jobs = []  # every job submitted, in order (what the worker did with each is on it)
        submit = self.queue.submit

        def recording_submit(job):
            submit(job)
            self.jobs.append(job)
        self.queue.submit = recording_submit
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.queue, self.config), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)

    def wait(self, condition, timeout=30, what="condition"):
        deadline = time.time() + timeout
        while not condition():
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def idle(self):
        s = self.queue.stats()
        return s["running"] == 0 and s["waiting"] == 0

    def stop(self):
        if self.gate is not None:
            self.gate.open()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.queue.close()


@pytest.fixture(scope="session")
def live_server():
    """live_server(argv, gate=False) -> a started LiveServer, stopped at the end of the session."""
    servers = []

    def start(argv, gate=False):
        servers.append(LiveServer(argv, gate))
        return servers[-1]
    yield start
    for s in servers:
        s.stop()
