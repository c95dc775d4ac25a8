"""The fine-tuning prompt template, shared by build_finetune_datasets.py and generate_finetuned.py.

    "\n\n### Context: {context}"            (only when there is a context)
    "\n\n### User: {question}\n\n### Assistant:"
completion: " {answer} END"

Multi-turn: earlier (question, answer) turns come first in the prompt, each as a User/Assistant
pair with its completion, then the new question.
"""
END_MARKER = " END"


def format_prompt(question: str, context: str = None, history=()) -> str:
    """The text the model is conditioned on. `history`: earlier (question, answer) turns."""
    parts = []
    if context:
        parts.append(f"\n\n### Context: {context}")
    for q, a in history:
        parts.append(f"\n\n### User: {q}\n\n### Assistant:{format_completion(a)}")
    parts.append(f"\n\n### User: {question}\n\n### Assistant:")
    return "".join(parts)


def format_completion(answer: str) -> str:
    """The text the model learns to produce after the prompt."""
    return f" {answer}{END_MARKER}"


def extract_answer(generated: str) -> str:
    """The answer from generated text: everything before the end marker (or a new turn), stripped."""
    for marker in (END_MARKER, "\n\n### User:", "\n\n### Context:"):
        cut = generated.find(marker)
        if cut != -1:
            generated = generated[:cut]
    return generated.strip()
