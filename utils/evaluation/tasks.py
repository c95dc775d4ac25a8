"""The evaluation tasks, built from their data set rows exactly as lm-eval-harness builds them.

Each row becomes an Example: one (context, continuation) request per choice, the gold choice, and
the choices' lengths in characters (lm-eval's acc_norm divides each log-likelihood by them).
Sources of the templates: lm-eval's tasks/hellaswag (utils.py), piqa.yaml, winogrande
(preprocess_winogrande.py), arc/arc_easy.yaml, lambada/lambada_openai.yaml.
"""
import math
import re
from dataclasses import dataclass

from utils.errors import UserError


@dataclass
class Example:
    requests: list          # [(context, continuation)], one per choice
    gold: int               # index of the right choice (LAMBADA: 0, its only request)
    choice_chars: list      # len() of each choice string: lm-eval's acc_norm denominator


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: WikiHow's " [title]" marks become ". ", other [tags] go, double spaces halve."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _choices(context, choices, gold):
    return Example([(context, " " + c) for c in choices], gold, [len(c) for c in choices])


def hellaswag(doc) -> Example:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return _choices(query, [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def piqa(doc) -> Example:
    return _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def winogrande(doc) -> Example:
    """Partial evaluation: the option fills the blank in the context; the rest of the sentence is the
    continuation, the same for both choices, so the comparison is over the option's effect on it."""
    s = doc["sentence"]
    i = s.index("_")
    contexts = [s[:i] + doc["option1"], s[:i] + doc["option2"]]
    target = " " + s[i + 1:].strip()
    return Example([(c, target) for c in contexts], {"1": 0, "2": 1}[str(doc["answer"])], [len(c) for c in contexts])


def arc_easy(doc) -> Example:
    labels = list(doc["choices"]["label"])
    gold = labels.index(doc["answerKey"])
    return _choices(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]), gold)


def lambada(doc) -> Example:
    words = doc["text"].split(" ")
    cont = " " + words[-1]
    return Example([(" ".join(words[:-1]), cont)], 0, [len(cont)])


BUILDERS = {"hellaswag": hellaswag, "piqa": piqa, "winogrande": winogrande, "arc_easy": arc_easy, "lambada": lambada}
MULTIPLE_CHOICE = ("hellaswag", "piqa", "winogrande", "arc_easy")
DOWNSTREAM = tuple(BUILDERS)
TASKS = (*DOWNSTREAM, "val_loss")


def build_examples(task, docs, source="data"):
    try:
        return [BUILDERS[task](d) for d in docs]
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{source}: a {task} row lacks the expected fields ({type(e).__name__}: {e}); "
                        f"see docs/evaluation.md for the accepted formats") from None


def multiple_choice_metrics(task, examples, scores):
    """scores[i]: Scores of example i's choices. acc: highest log-likelihood; acc_norm: highest
    log-likelihood per character of the choice (lm-eval); acc_norm_tokens: per token (llm.c)."""
    n = len(examples)
    acc = acc_norm = acc_tok = 0
    for ex, sc in zip(examples, scores):
        ll = [s.loglik for s in sc]
        acc += _argmax(ll) == ex.gold
        acc_norm += _argmax([x / c for x, c in zip(ll, ex.choice_chars)]) == ex.gold
        acc_tok += _argmax([s.loglik / s.n_tokens for s in sc]) == ex.gold
    if task == "winogrande":  # lm-eval reports acc only: the "choices" are the two contexts
        return {"acc": acc / n, "n": n}
    return {"acc": acc / n, "acc_norm": acc_norm / n, "acc_norm_tokens": acc_tok / n, "n": n}


def lambada_metrics(scores):
    """acc: the last word is the greedy continuation; perplexity: exp(-mean log-likelihood of it)."""
    n = len(scores)
    lls = [s[0].loglik for s in scores]
    return {"acc": sum(s[0].is_greedy for s in scores) / n, "perplexity": math.exp(-sum(lls) / n), "n": n}


def _argmax(xs):
    """First index of the maximum, like numpy.argmax (ties go to the earlier choice)."""
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def parse_tasks(text, flag="--tasks", allowed=TASKS):
    """'hellaswag:500,piqa' -> [('hellaswag', 500), ('piqa', None)]: task names with an optional limit."""
    specs = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, limit = item.partition(":")
        if name not in allowed:
            raise UserError(f"{flag}: unknown task {name!r}; choose from {', '.join(allowed)}")
        try:
            n = int(limit) if limit else None
        except ValueError:
            raise UserError(f"{flag}: {item!r}: the limit after ':' must be a whole number") from None
        if n is not None and n < 1:
            raise UserError(f"{flag}: {item!r}: the limit must be >= 1")
        specs.append((name, n))
    if not specs:
        raise UserError(f"{flag}: no task given; choose from {', '.join(allowed)}")
    return specs
