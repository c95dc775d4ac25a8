"""A chat request's prompt is the prompt the dataset builder trains the same dialogue's last answer on:
build_finetune_datasets.py's path (prepare's record reader, then tokenize_example) is the reference."""
import pytest

from utils.data.finetune import examples_from_record, tokenize_example
from utils.serving.app import chat_prompt_ids
from utils.serving.schemas import ChatCompletionRequest
from utils.tokenizer import get_tokenizer

DIALOGUES = [
    [("user", "Who wrote Hamlet?")],
    [("system", "Be brief."), ("user", "Who wrote Hamlet?")],
    [("user", "Hi"), ("assistant", "Hello!"), ("user", "Who wrote Hamlet?")],
    [("system", "Context one."), ("user", "First"), ("assistant", "A1"), ("system", "Context two."),
     ("user", "Second"), ("user", "and more"), ("assistant", "A2"), ("user", "Third?")],
]


@pytest.mark.parametrize("turns", DIALOGUES)
def test_chat_prompt_is_the_builders_prompt(turns):
    answer = "The answer."
    record = {"messages": [{"role": r, "content": t} for r, t in [*turns, ("assistant", answer)]]}
    examples, _ = examples_from_record(record)
    built_prompt_ids, _, _ = tokenize_example(examples[-1], max_seq_len=None, enc=get_tokenizer())
    request = ChatCompletionRequest.model_validate({"messages": record["messages"][:-1]})
    assert chat_prompt_ids(request) == built_prompt_ids
