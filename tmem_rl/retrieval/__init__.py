"""Retrieval.

Two scales, two indexes. The texts of one episode (a conversation's turns for the retrieval baseline, explicit
notes, a synthetic search world's few dozen documents) are ranked by `BM25Index` (rank_bm25, built per episode).
A corpus that search tools query (a task's paragraphs, a user's JSONL file, Wikipedia) sits behind a `Retriever`
(`tmem_rl.retrieval.corpus`): in process over a bm25s index, or over HTTP against a Search-R1-style retrieval server
(`tmem_rl.retrieval.client`), such as the one `tmem-rl serve-retriever` runs (`tmem_rl.retrieval.server`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

from rank_bm25 import BM25Okapi

from tmem_rl.errors import InputError

if TYPE_CHECKING:
    from tmem_rl.retrieval.corpus import Passage, Retriever

_WORD = re.compile(r"\w+")


def bm25_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25Index:
    """A BM25 index built once over `documents`, queried many times."""

    def __init__(self, documents: list[str]):
        self.size = len(documents)
        # rank_bm25 divides by the mean document length: an empty document gets a placeholder token.
        self._bm25 = BM25Okapi([bm25_tokens(d) or ["<empty>"] for d in documents]) if documents else None

    def ranked(self, query: str, k: int) -> list[int]:
        """Indices of the k best matches, best first (ties in document order)."""
        if self._bm25 is None or k <= 0:
            return []
        scores = self._bm25.get_scores(bm25_tokens(query))
        return sorted(range(self.size), key=lambda i: (-scores[i], i))[:k]


def bm25_top_k(documents: list[str], query: str, k: int) -> list[int]:
    """Indices of the k best BM25 matches, returned in document order (stream order reads naturally)."""
    return sorted(BM25Index(documents).ranked(query, k))


RETRIEVER_KINDS = ("bm25", "http")


def make_retriever(spec: Any, where: str, passages: Sequence["Passage"] = ()) -> "Retriever":
    """The retriever a recipe names (`env.kwargs.retriever`):

    - None or {"kind": "bm25"}: BM25 in this process over `passages` (what the environment supplies, e.g. a task's
      own paragraphs), or over {"kind": "bm25", "corpus": "corpus.jsonl"};
    - {"kind": "http", "url": "http://host:8000/retrieve", "timeout_s": 10, "retries": 3, "backoff_s": 0.5}: a
      retrieval server speaking the Search-R1 protocol, checked once here so that a wrong URL stops the run now.
    """
    from tmem_rl.retrieval.client import HTTPRetriever
    from tmem_rl.retrieval.corpus import CorpusIndex

    spec = {"kind": "bm25"} if spec is None else spec
    if not isinstance(spec, dict) or spec.get("kind") not in RETRIEVER_KINDS:
        raise InputError(f"{where}: retriever must be a mapping with kind one of {', '.join(RETRIEVER_KINDS)}, "
                         f"got {spec!r}")
    settings = {key: value for key, value in spec.items() if key != "kind"}
    if spec["kind"] == "http":
        unknown = set(settings) - {"url", "timeout_s", "retries", "backoff_s", "cache_size"}
        if unknown or not isinstance(settings.get("url"), str):
            raise InputError(f"{where}: an http retriever takes url (a string), timeout_s, retries, backoff_s and "
                             f"cache_size; got {spec!r}")
        retriever = HTTPRetriever(**settings)
        retriever.check()
        return retriever
    if set(settings) - {"corpus"}:
        raise InputError(f"{where}: a bm25 retriever takes only corpus (a JSONL file); got {spec!r}")
    if "corpus" in settings:
        if not isinstance(settings["corpus"], str):
            raise InputError(f"{where}: retriever corpus must be the path of a JSONL file, got {settings['corpus']!r}")
        return CorpusIndex.from_jsonl(settings["corpus"])
    if not passages:
        raise InputError(f"{where}: this environment has no passages of its own: name a corpus "
                         f"(retriever: {{kind: bm25, corpus: corpus.jsonl}}) or a server (kind: http)")
    return CorpusIndex(passages)
