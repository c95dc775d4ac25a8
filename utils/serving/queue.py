"""One generation at a time, in a worker thread, behind a bounded queue.

Requests are generated one after another by a single worker thread (`model.generate` builds a KV
cache per call, so no request ever sees another's keys and values), while the event loop keeps
serving HTTP. A request waits in a queue of at most `max_queue`; one more is refused (`QueueFull`,
a 503). Text goes back to the request's coroutine as it is generated (`Job.events`); a request
whose client went away is cancelled: skipped if it is still waiting, stopped at its next token if
it is running.
"""
import asyncio
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace

from utils.generation.streaming import Streamer, summary
from utils.serving.text import ReplyText


class QueueFull(Exception):
    pass


@dataclass
class Sampling:
    """One request's settings, as the generation scripts' flags name them (what `Streamer` reads)."""
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    max_new_tokens: int
    seed: int | None
    dtype: str
    speculate: str = "none"     # "lookup": prompt-lookup drafts (the server's --speculate; greedy requests only)


@dataclass
class Job:
    prompt_ids: list
    sampling: Sampling
    chat: bool                  # cut the reply at the prompt template's end of an answer
    stops: list
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    new_tokens: int = 0         # tokens generated (read by tests and the log once the job is done)

    def put(self, *event):
        """From the worker thread: hand an event to the request's coroutine."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self):
        self.cancelled.set()


class GenerationQueue:
    def __init__(self, model, device, max_queue: int):
        self.model, self.device, self.max_queue = model, device, max_queue
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.lock = threading.Lock()
        self.waiting = 0        # submitted, not started
        self.running = 0

    def submit(self, job: Job):
        """Queue `job`; QueueFull if `max_queue` requests are already waiting."""
        with self.lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(f"the server is busy: {self.waiting} request(s) waiting (--max_queue "
                                f"{self.max_queue}); retry later")
            self.waiting += 1
        self.worker.submit(self._run, job)

    def stats(self) -> dict:
        with self.lock:
            return {"running": self.running, "waiting": self.waiting, "max_queue": self.max_queue}

    def close(self):
        self.worker.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job):
        with self.lock:
            self.waiting -= 1
            self.running += 1
        try:
            if not job.cancelled.is_set():
                self._generate(job)
        except Exception as e:  # a bug, not the user's: the request gets a 500, the server lives on
            traceback.print_exc()
            job.put("error", f"{type(e).__name__}: {e}")
        finally:
            with self.lock:
                self.running -= 1

    def _generate(self, job: Job):
        reply = ReplyText(job.chat, job.stops)
        streamer = Streamer(self.model, SimpleNamespace(**job.sampling.__dict__), self.device)

        def on_text(piece):
            out, done = reply.push(piece)
            if out:
                job.put("text", out)
            return done or job.cancelled.is_set()

        result = streamer.run(job.prompt_ids, on_text)
        rest = reply.finish()
        if rest:
            job.put("text", rest)
        # Ended by the model's stop token (not appended to new_ids) when neither the text nor the
        # client stopped it and the budget was not used up; that token counts as generated.
        eot = not reply.stopped and not job.cancelled.is_set() and len(result.new_ids) < job.sampling.max_new_tokens
        job.new_tokens = len(result.new_ids) + eot
        finish = "stop" if reply.stopped or eot else "length"
        summary(result, "cancelled: " if job.cancelled.is_set() else "")
        job.put("done", finish, job.new_tokens)
