"""A passage corpus and the retrievers that search tools query.

A `Retriever` takes a batch of queries and returns each one's top passages. Two implement it: `CorpusIndex`, a
BM25 index held in this process (bm25s), and `HTTPRetriever` (`tmem_rl.retrieval.client`), a client of a
Search-R1-style retrieval server. A recipe picks one with the spec `tmem_rl.retrieval.make_retriever` reads, so
the episode loop never knows which it talks to.

A corpus file is JSONL, one passage per line: `{"id": ..., "contents": ...}` (the Search-R1 / FlashRAG format,
whose `contents` is `"Title"` on the first line, then the text).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from tmem_rl.errors import InputError

# Lucene's BM25 parameters as Pyserini sets them, which Search-R1's BM25 retriever uses: a corpus served here ranks
# as users of that retriever expect.
BM25_K1 = 0.9
BM25_B = 0.4
TOKEN_PATTERN = r"(?u)\b\w+\b"  # every word, one-letter ones too ("a 5 year plan": the 5 counts)


class RetrieverError(InputError):
    """A retriever could not answer: the server is down, too slow, or replied with something else than the
    protocol. The message names the retriever (its URL) and what went wrong."""


@dataclass(frozen=True)
class Passage:
    id: str
    contents: str
    score: float = 0.0

    @property
    def title(self) -> str:
        """The first line without its quotes: the page title in the Search-R1 corpus format."""
        return self.contents.split("\n", 1)[0].strip().strip('"')

    def document(self) -> dict[str, str]:
        """The passage as the retrieval protocol sends it."""
        return {"id": self.id, "contents": self.contents}


def shortened(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters: a bad value quoted in an error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def titled(title: str, text: str) -> str:
    """A passage's contents in the Search-R1 corpus format: the quoted title on the first line, then the text."""
    return f'"{title}"\n{text}'


class Retriever(ABC):
    """Top passages for a batch of queries."""

    name: str = "retriever"
    """What error messages and records call it: "bm25 over corpus.jsonl", "http://host:8000/retrieve"."""

    @abstractmethod
    def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        """For each query, at most `k` passages, best first."""


class CorpusIndex(Retriever):
    """BM25 over a list of passages, in this process (bm25s: a sparse score matrix built once, so a query costs
    milliseconds on 100K+ passages; benchmarks/retriever_qps.py measures it against rank_bm25)."""

    def __init__(self, passages: Sequence[Passage], name: str = "bm25"):
        import bm25s
        from bm25s.tokenization import Tokenizer

        if not passages:
            raise InputError(f"{name}: the corpus has no passages")
        self.passages = list(passages)
        self.name = name
        self._tokenizer = Tokenizer(splitter=TOKEN_PATTERN, stopwords="en")
        ids = self._tokenizer.tokenize([p.contents for p in self.passages], return_as="ids", show_progress=False)
        self._bm25 = bm25s.BM25(method="lucene", k1=BM25_K1, b=BM25_B)
        self._bm25.index(ids, show_progress=False)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike) -> "CorpusIndex":
        return cls(read_corpus(path), name=f"bm25 over {path}")

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        if k <= 0:
            return [[] for _ in queries]
        if not queries:
            return []
        # Reads only: the vocabulary is fixed after indexing (update_vocab=False), so server threads may query at once.
        # Words the corpus never has map to the empty word, which only empty passages hold: dropped, so that a query
        # of unknown words finds nothing rather than the empty passages.
        empty = self._tokenizer.get_vocab_dict().get("")
        tokens = [[i for i in row if i != empty] for row in
                  self._tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids", show_progress=False)]
        asked = [row for row in tokens if row]
        results: list[list[Passage]] = [[] for _ in queries]
        if not asked:
            return results
        rows, scores = self._bm25.retrieve(asked, k=min(k, len(self.passages)), show_progress=False, n_threads=0)
        answered = iter(zip(rows.tolist(), scores.tolist()))
        for q, row in enumerate(tokens):
            if not row:
                continue
            ids, row_scores = next(answered)
            # A passage that shares no word with the query scores 0: it is not a result. Ties go in corpus order.
            hits = sorted((-score, i) for i, score in zip(ids, row_scores) if score > 0)
            results[q] = [Passage(self.passages[i].id, self.passages[i].contents, -neg) for neg, i in hits]
        return results


def read_corpus(path: str | os.PathLike) -> list[Passage]:
    """The passages of a JSONL corpus file; a line that is not `{"id": ..., "contents": "..."}` is an error naming
    the file, the line and the field."""
    from tmem_rl.envs import read_jsonl

    return [_passage(f"{path}, line {number}", item)
            for number, item in read_jsonl(path, '{"id", "contents"} passages')]


def _passage(where: str, item: object) -> Passage:
    if not isinstance(item, dict):
        raise InputError(f'{where}: expected an object {{"id", "contents"}}, got {type(item).__name__}')
    contents = item.get("contents")
    if not isinstance(contents, str):
        raise InputError(f"{where}: field 'contents' must be a string, got {contents!r}")
    if "id" not in item or isinstance(item["id"], (dict, list)) or item["id"] is None:
        raise InputError(f"{where}: field 'id' must be a string or a number, got {item.get('id')!r}")
    return Passage(str(item["id"]), contents)
