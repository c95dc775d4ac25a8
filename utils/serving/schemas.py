"""The OpenAI request shapes the server accepts, and its error body.

Every field the OpenAI API defines for these endpoints is declared, so a value of the wrong type is
a 400 (strict: "0.5" is not a number, 1 is not a string), never a silent coercion. Fields we cannot
honour are refused with a 400 when set to anything but their neutral value (see `unsupported`).
Fields the API does not define are ignored, as vLLM does, so clients that send extras keep working.
vLLM's extensions `top_k` and `repetition_penalty` are accepted.
"""
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_RANGE = dict(ge=-(2 ** 63), le=2 ** 64 - 1)  # what torch.Generator.manual_seed takes


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str | None = None              # required by OpenAI; optional here (one model is served)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: float | None = None
    top_k: int | None = None              # vLLM's extension; 0 or -1 = no limit
    repetition_penalty: float | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(**SEED_RANGE)] | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do, or None."""
        if self.n != 1:
            return "n: only n=1 is supported"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty / frequency_penalty are not supported (use repetition_penalty)"
        if self.logit_bias:
            return "logit_bias is not supported"
        if len(self.stop_strings()) > 4:
            return "stop: at most 4 stop strings"
        return None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    def unsupported(self):
        if self.logprobs or self.top_logprobs:
            return "logprobs are not supported"
        if self.tools:
            return "tools are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format: only type 'text' is supported"
        return super().unsupported()


class CompletionRequest(_Sampling):
    # One prompt: text, or token ids (a list of one of either is accepted too).
    prompt: str | list[str] | list[int] | list[list[int]] = "<|endoftext|>"
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self):
        if self.echo:
            return "echo is not supported"
        if self.logprobs:
            return "logprobs are not supported"
        if self.best_of not in (None, 1):
            return "best_of: only 1 is supported"
        if self.suffix:
            return "suffix is not supported"
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str | list) \
                and len(self.prompt) != 1:
            return "prompt: one prompt per request (send several requests; they are queued)"
        return super().unsupported()


def error_body(message: str, type_: str = "invalid_request_error", param: str = None, code: str = None) -> dict:
    """The OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
