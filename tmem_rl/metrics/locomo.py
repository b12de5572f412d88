"""The LoCoMo QA metric, matching the benchmark's official evaluation (snap-research/locomo, task_eval/evaluation.py).

Scores must be comparable with published LoCoMo numbers, so the quirks of the official code are kept on purpose:
commas are deleted before tokenising, "and" counts as an article, tokens are Porter-stemmed for F1 but not for exact
match, and exact match compares token sets, so word order and repeats do not matter.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

from nltk.stem import PorterStemmer

from tmem_rl.metrics.qa import mean

CATEGORY_NAMES: dict[int, str] = {
    1: "multi-hop",
    2: "temporal",
    3: "open-domain",
    4: "single-hop",
    5: "adversarial",
}
ADVERSARIAL_PHRASES = ("no information available", "not mentioned")

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the|and)\b")
_STEMMER = PorterStemmer()


def normalize_answer(s: str) -> str:
    s = str(s).replace(",", "").lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _stems(s: str) -> list[str]:
    return [_STEMMER.stem(w) for w in normalize_answer(s).split()]


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = _stems(prediction), _stems(gold)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def multi_hop_f1(prediction: str, gold: str) -> float:
    """Each comma-separated gold item is credited with its best-matching predicted item; items are averaged."""
    preds = [p.strip() for p in str(prediction).split(",")]
    golds = [g.strip() for g in str(gold).split(",")]
    return sum(max(token_f1(p, g) for p in preds) for g in golds) / len(golds)


def adversarial_score(prediction: str) -> float:
    text = str(prediction).lower()
    return 1.0 if any(phrase in text for phrase in ADVERSARIAL_PHRASES) else 0.0


def exact_match(prediction: str, gold: str) -> float:
    return float(set(normalize_answer(prediction).split()) == set(normalize_answer(gold).split()))


def score_answer(prediction: str, gold: Any, category: int) -> dict[str, float]:
    """F1 and exact match of one answer under its category's rule; `gold` may be an int, as in the JSON."""
    prediction, gold = str(prediction), str(gold)
    if category == 5:
        # Adversarial questions have no answer in the conversation; only declining to answer is correct.
        score = adversarial_score(prediction)
        return {"f1": score, "em": score}
    if category == 3:
        # Open-domain golds read "answer; rationale"; only the answer is scored.
        gold = gold.split(";")[0].strip()
    if category == 1:
        f1 = multi_hop_f1(prediction, gold)
    elif category in (2, 3, 4):
        f1 = token_f1(prediction, gold)
    else:
        raise ValueError(f"locomo metric: category must be one of {sorted(CATEGORY_NAMES)}, got {category!r}")
    return {"f1": f1, "em": exact_match(prediction, gold)}


def aggregate(records: list[dict]) -> dict[str, Any]:
    """Summary over scored records ({"category", "f1", "em"}, optionally "seconds"), in LoCoMo's reporting shape.

    "f1_1_4" leaves out the adversarial category, which many papers report separately; "f1_1_5" covers all.
    """
    for i, r in enumerate(records):
        if r.get("category") not in CATEGORY_NAMES:
            raise ValueError(
                f"locomo aggregate: record {i} field 'category' must be one of {sorted(CATEGORY_NAMES)}, "
                f"got {r.get('category')!r}"
            )
    by_category = {
        str(c): mean([float(r["f1"]) for r in records if r["category"] == c]) for c in sorted(CATEGORY_NAMES)
    }
    seconds = [float(r["seconds"]) for r in records if r.get("seconds") is not None]
    return {
        "n": len(records),
        "f1_by_category": by_category,
        "f1_1_4": mean([float(r["f1"]) for r in records if r["category"] != 5]),
        "f1_1_5": mean([float(r["f1"]) for r in records]),
        "em": mean([float(r["em"]) for r in records]),
        "seconds_per_episode": mean(seconds),
    }
