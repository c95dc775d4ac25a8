"""The OpenAI-compatible HTTP API and the chat page, on FastAPI.

    POST /v1/chat/completions   messages -> the fine-tuning prompt template (multi-turn as the dataset
                                builder groups a dialogue) -> the answer, cut at " END" / a new turn
    POST /v1/completions        a prompt (text or token ids) -> its plain continuation
    GET  /v1/models, /health, / (the chat page, static/)

Both POSTs stream as server-sent events with "stream": true. Errors have OpenAI's body
{"error": {"message", "type", "param", "code"}}: 400 for a bad request (bad JSON, a wrong type, a
prompt that leaves no room in the context), 401 for a wrong key, 404 for an unknown model or
route, 503 when the queue is full. With an API key, every /v1 route needs `Authorization: Bearer KEY`.
"""
import asyncio
import contextlib
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass, replace

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.sampling import check_sampling_args
from utils.data.finetune import dialogue_prompt
from utils.serving.queue import GenerationQueue, Job, QueueFull, Sampling
from utils.serving.schemas import ChatCompletionRequest, CompletionRequest, error_body
from utils.tokenizer import EOT_TOKEN, get_tokenizer

UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class APIError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


@dataclass
class ServerConfig:
    model_name: str
    block_size: int
    defaults: Sampling          # the command line's sampling flags: what a request leaves unset
    api_key: str | None = None
    max_queue: int = 16


# ------------------------------------------------------------------------------------- requests

def sampling_for(req, defaults: Sampling, max_tokens: int) -> Sampling:
    """The request's settings over the server's defaults; APIError(400) for a value out of range."""
    top_k = defaults.top_k if req.top_k is None else req.top_k
    if top_k < -1:
        raise APIError(400, f"top_k must be >= 1, or 0 / -1 for no limit; got {top_k}", param="top_k")
    s = replace(defaults, max_new_tokens=max_tokens, seed=req.seed, top_k=max(top_k, 0),
                temperature=defaults.temperature if req.temperature is None else req.temperature,
                top_p=defaults.top_p if req.top_p is None else req.top_p,
                repetition_penalty=defaults.repetition_penalty if req.repetition_penalty is None
                else req.repetition_penalty)
    try:
        check_sampling_args(s.temperature, s.top_k or None, s.top_p, s.repetition_penalty)
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split()[0]) from None
    if s.temperature != 0 or s.repetition_penalty != 1.0:  # speculation gives greedy tokens only
        s = replace(s, speculate="none")
    return s


def chat_prompt_ids(req: ChatCompletionRequest) -> list:
    """messages -> token ids of the prompt the model was fine-tuned on (system -> the context)."""
    turns = [("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
    if turns[-1][0] != "user" or not turns[-1][1].strip():
        raise APIError(400, "messages: the last message must be a non-empty user message (the question to answer)",
                       param="messages")
    return get_tokenizer().encode_ordinary(dialogue_prompt(turns))


def completion_prompt_ids(req: CompletionRequest) -> list:
    """The prompt as token ids (text may name <|endoftext|>); an empty prompt is <|endoftext|> alone."""
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    enc = get_tokenizer()
    if isinstance(prompt, str):
        ids = enc.encode(prompt, allowed_special={"<|endoftext|>"})
    else:
        bad = [t for t in prompt if not 0 <= t < enc.n_vocab]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {enc.n_vocab})",
                           param="prompt")
        ids = list(prompt)
    return ids or [EOT_TOKEN]


def token_budget(config: ServerConfig, n_prompt: int, max_tokens, param: str) -> int:
    """max_tokens checked against the context, as vLLM does: prompt + max_tokens <= block_size.
    Unset: the server's --max_new_tokens, or what the context has left if that is less."""
    room = config.block_size - n_prompt
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {config.block_size} tokens; the prompt has "
                            f"{n_prompt}, which leaves no room for an answer. Shorten the prompt "
                            "(or, in a chat, drop earlier messages).", param=param, code="context_length_exceeded")
    if max_tokens is None:
        return min(config.defaults.max_new_tokens, room)
    if max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {config.block_size} tokens; you requested "
                            f"{n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} for the answer). "
                            "Reduce max_tokens or the prompt.", param="max_tokens", code="context_length_exceeded")
    return max_tokens


async def parse(request: Request, schema):
    """The body as `schema`, whatever the Content-Type says (curl -d sends a form type); APIError(400) naming
    the first bad field, or saying the body is not JSON."""
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            why = err.get("ctx", {}).get("error", err["msg"])
            raise APIError(400, f"the request body is not valid JSON: {why}") from None
        # The field's path, without the names pydantic gives the members of a union ("str", "list[int]")
        path = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in UNION_TAGS))]
        where = ".".join(path)
        raise APIError(400, f"{where or 'body'}: {err['msg']}", param=path[0] if path else None) from None


# ---------------------------------------------------------------------------------------- responses

def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def usage(n_prompt, n_new) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


async def wait_for_disconnect(request: Request):
    """Returns when the client has gone (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Reply:
    """One request's round trip through the queue, in OpenAI's chat or completion shape."""

    def __init__(self, queue, config, chat, req, prompt_ids, max_tokens):
        self.chat, self.req, self.n_prompt = chat, req, len(prompt_ids)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = config.model_name
        self.job = Job(prompt_ids, sampling_for(req, config.defaults, max_tokens), chat, req.stop_strings(),
                       asyncio.get_running_loop())
        try:
            queue.submit(self.job)
        except QueueFull as e:
            raise APIError(503, str(e), type_="server_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None

    def _envelope(self, choices, chunk=False, usage_=None):
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage_ is not None or not chunk:
            out["usage"] = usage_
        return out

    def _choice(self, text, finish, chunk):
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        key, body = ("delta", {"content": text} if text else {}) if chunk else \
            ("message", {"role": "assistant", "content": text})
        return {"index": 0, key: body, "logprobs": None, "finish_reason": finish}

    async def events(self):
        """("text", piece) ... then ("done", finish_reason, new_tokens); APIError(500) if generation failed."""
        while True:
            event = await self.job.events.get()
            if event[0] == "error":
                raise APIError(500, f"generation failed: {event[1]}", type_="server_error")
            yield event
            if event[0] == "done":
                return

    async def whole(self, request: Request) -> dict:
        """The non-streamed response; a client that leaves cancels the job."""
        async def collect():
            text = []
            async for event in self.events():
                if event[0] == "text":
                    text.append(event[1])
                else:
                    return "".join(text), event[1], event[2]

        result, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.job.cancel()  # a no-op once done; stops the worker if the client left first
            gone.cancel()
        if not result.done():  # the client left: nobody to answer
            result.cancel()
            return JSONResponse(error_body("the client disconnected"), status_code=499)
        text, finish, n_new = result.result()
        return self._envelope([self._choice(text, finish, False)], usage_=usage(self.n_prompt, n_new))

    async def stream(self):
        """Server-sent events: chunks as text comes, the last with finish_reason and usage, then [DONE].
        Starlette cancels this generator when the client disconnects; `finally` then stops the job."""
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        try:
            if self.chat:
                first = self._choice("", None, True)
                first["delta"] = {"role": "assistant", "content": ""}
                yield sse(self._envelope([first], chunk=True))
            try:
                async for event in self.events():
                    if event[0] == "text":
                        yield sse(self._envelope([self._choice(event[1], None, True)], chunk=True))
                        continue
                    _, finish, n_new = event
                    u = usage(self.n_prompt, n_new)
                    yield sse(self._envelope([self._choice("", finish, True)], chunk=True,
                                             usage_=None if include_usage else u))
                    if include_usage:  # OpenAI's shape: a last chunk with no choices, only usage
                        yield sse(self._envelope([], chunk=True, usage_=u))
            except APIError as e:
                yield sse(e.body)
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancel()


# -------------------------------------------------------------------------------------------- app

def create_app(queue: GenerationQueue, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="miniGPT", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queue, app.state.config = queue, config

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), type_), status_code=e.status_code, headers=e.headers)

    def check_key(request: Request):
        if config.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "Incorrect API key provided: send `Authorization: Bearer KEY` with the server's "
                                "--api_key", code="invalid_api_key")

    def check_request(req):
        if req.model is not None and req.model != config.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves "
                                f"`{config.model_name}` (GET /v1/models)", type_="not_found_error",
                           param="model", code="model_not_found")
        problem = req.unsupported()
        if problem:
            raise APIError(400, problem, param=problem.split(":")[0].split()[0])

    async def respond(request, reply):
        if reply.req.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.whole(request)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request):
        req = await parse(request, ChatCompletionRequest)
        check_request(req)
        ids = chat_prompt_ids(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        budget = token_budget(config, len(ids), max_tokens, "messages")
        return await respond(request, Reply(queue, config, True, req, ids, budget))

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        check_request(req)
        ids = completion_prompt_ids(req)
        budget = token_budget(config, len(ids), req.max_tokens, "prompt")
        return await respond(request, Reply(queue, config, False, req, ids, budget))

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                             "owned_by": "miniGPT", "max_model_len": config.block_size}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **queue.stats()}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


@contextlib.contextmanager
def serving(model, device, config: ServerConfig):
    """The app with its generation queue; the worker thread is shut down on exit."""
    queue = GenerationQueue(model, device, config.max_queue)
    try:
        yield create_app(queue, config)
    finally:
        queue.close()
