"""Stop strings and the chat answer's end, fed in arbitrary pieces: what is sent, joined, equals
the whole text cut at the first stop (str.find on the whole text is the reference)."""
import random

import pytest

from utils.prompt_template import extract_answer
from utils.serving.text import ReplyText, StopStrings


def pieces(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def feed(filter_, parts):
    out, done_at = [], None
    for i, part in enumerate(parts):
        sent, done = filter_.push(part)
        out.append(sent)
        if done:
            done_at = i
            break
    out.append(filter_.finish())
    return "".join(out), done_at


@pytest.mark.parametrize("seed", range(30))
def test_stop_strings_in_any_pieces(seed):
    rng = random.Random(seed)
    text = "The ship carries the morning light. Stop here? The END of it\n\nUser: more"
    stops = rng.sample(["light.", "here?", "END", "\n\n", "never", "carries the m", "zz"], k=rng.randint(1, 4))
    hits = [text.find(s) for s in stops if s in text]
    expected = text[:min(hits)] if hits else text
    got, done_at = feed(StopStrings(stops), pieces(text, rng))
    assert got == expected
    assert (done_at is not None) == bool(hits)


def test_nothing_is_held_back_for_good_and_partial_matches_are_sent():
    s = StopStrings(["abc"])
    assert s.push("xxab") == ("xx", False)  # "ab" may begin "abc": held
    assert s.push("d") == ("abd", False)    # it did not
    assert s.finish() == ""
    s = StopStrings(["abc"])
    assert s.push("xab") == ("x", False)
    assert s.finish() == "ab"               # the end of generation releases the held tail


@pytest.mark.parametrize("seed", range(20))
def test_chat_reply_is_the_answer_cut_at_stops(seed):
    rng = random.Random(seed)
    generated = " The apple is red, and the car is blue. END\n\n### User: next"
    stops = rng.choice([[], ["car"], ["blue. E"], ["nowhere"]])
    answer = extract_answer(generated)
    hits = [answer.find(s) for s in stops if s in answer]
    reply = ReplyText(chat=True, stops=stops)
    got, done_at = feed(reply, pieces(generated, rng))
    assert got == (answer[:min(hits)] if hits else answer) == reply.full
    assert done_at is not None and reply.stopped  # " END" (or a stop string) ended it
