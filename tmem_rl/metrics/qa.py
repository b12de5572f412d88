"""Answer scoring shared by environments: SQuAD-style normalisation, token F1 and exact match."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # An empty gold is only matched by an empty prediction.
        return float(pred_tokens == gold_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def mean(values: list[float]) -> float | None:
    """The mean of `values`; None when there are none (a summary shows an empty group as null, not as 0)."""
    return sum(values) / len(values) if values else None


def best_over_golds(fn: Callable[[str, str], float], prediction: str, golds: Iterable[str]) -> float:
    """The best score of `prediction` against any accepted answer; 0.0 when there are none."""
    return max((fn(prediction, gold) for gold in golds), default=0.0)


# HotpotQA's evaluation script: a yes / no / noanswer on either side scores F1 only as an exact match.
HOTPOTQA_YES_NO = frozenset({"yes", "no", "noanswer"})


def hotpotqa_f1(prediction: str, gold: str) -> float:
    """Token F1 as the official HotpotQA script computes it: 0 when either normalized string is yes, no or noanswer
    and the two differ ("yes" against "yes it is" is wrong, not half right)."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in HOTPOTQA_YES_NO or ref in HOTPOTQA_YES_NO) and pred != ref:
        return 0.0
    return token_f1(prediction, gold)
