"""BM25 over short texts (rank_bm25): what the retrieval baseline, explicit notes and search tools rank with."""

from __future__ import annotations

import re

from rank_bm25 import BM25Okapi

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
