"""What a request gets back of the generated text, piece by piece: cut at its stop strings (OpenAI's
`stop`, the stop string itself not included) and, for chat, at the prompt template's end of an answer.

Both can arrive split across pieces, so the tail that could still become a stop string waits until
the next piece shows what it is. Streamed pieces joined equal the non-streamed text.
"""
from utils.generation.streaming import AnswerStream


class StopStrings:
    """Text in, text out up to the first stop string; `push` returns (text to send, done)."""

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.text, self.sent, self.done = "", 0, False

    def push(self, piece: str):
        if self.done:
            return "", True
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))  # a match may begin in sent text
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i != -1]
        if hits:
            self.done = True
            return self._advance(min(hits)), True
        return self._advance(len(self.text) - self._held()), False

    def finish(self) -> str:
        return "" if self.done else self._advance(len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        return max((n for s in self.stops for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if s.startswith(self.text[-n:])), default=0)

    def _advance(self, safe: int) -> str:
        out = self.text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return out


class ReplyText:
    """The text a request returns: the answer (chat: `AnswerStream`, the text before " END" or a new
    turn) or the raw continuation (completions), then cut at the request's stop strings."""

    def __init__(self, chat: bool, stops=()):
        self.answer = AnswerStream() if chat else None
        self.stops = StopStrings(stops)
        self.text, self.stopped = [], False  # stopped: a marker or stop string ended the reply

    def push(self, piece: str):
        """-> (text to send, done)."""
        done = False
        if self.answer is not None:
            piece, done = self.answer.push(piece)
        out, stop_done = self.stops.push(piece)
        self.stopped = done or stop_done
        self.text.append(out)
        return out, self.stopped

    def finish(self) -> str:
        """The rest, once generation has ended."""
        rest = ""
        if self.answer is not None and not self.stops.done:
            rest, done = self.stops.push(self.answer.finish())
            self.stopped = self.stopped or done
        rest += self.stops.finish()
        self.text.append(rest)
        return rest

    @property
    def full(self) -> str:
        return "".join(self.text)
