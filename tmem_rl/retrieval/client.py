"""A client of a Search-R1-style retrieval server.

The protocol (Search-R1, MEM1, verl's search tool): POST `{"queries": [...], "topk": k, "return_scores": true}` to
the server's `/retrieve`; it replies `{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}`, one
list per query, best first. Any server that speaks it works: `tmem-rl serve-retriever` (BM25), or a dense FAISS one.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from typing import Any, Sequence

from tmem_rl.retrieval.corpus import Passage, Retriever, RetrieverError, shortened


class HTTPRetriever(Retriever):
    """Batched queries over HTTP, with a timeout per request, retries with exponential back-off on connection
    failures, timeouts and server errors (5xx), and a cache of answered queries: the G rollouts of a group often
    search the same words, and a fixed corpus answers a query the same way every time."""

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.5,
                 cache_size: int = 4096):
        for field, value, low in (("timeout_s", timeout_s, 0), ("retries", retries, 0), ("backoff_s", backoff_s, 0),
                                  ("cache_size", cache_size, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low \
                    or (field == "timeout_s" and value == 0):
                raise RetrieverError(f"retriever at {url}: {field} must be a number > 0 (>= 0 for retries, "
                                     f"back-off and cache), got {value!r}")
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018  (reading it checks it: "host:80a" raises here, not in the first search)
        except ValueError as err:
            raise RetrieverError(f"retriever: url {url!r} is not a URL ({err})") from err
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RetrieverError(f"retriever: url must be http:// or https:// and a host, got {url!r}")
        self.url = url
        self.name = url
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple[str, int], list[Passage]] = OrderedDict()
        self.requests = 0  # POSTs sent, retries included: what a benchmark or a test counts

    def check(self) -> None:
        """One small query, so that a server that is down or speaks another protocol is found before a run
        starts, not in its first rollout."""
        self._post(["retrieval check"], 1)

    def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        found = {}
        for query in queries:
            if (query, k) in self._cache:
                self._cache.move_to_end((query, k))  # least recently used goes first
                found[query] = self._cache[(query, k)]
        missing = [q for q in dict.fromkeys(queries) if q not in found]
        if missing:  # one request for every query the cache does not hold
            found.update(zip(missing, self._post(missing, k)))
            for query in missing:
                self._cache[(query, k)] = found[query]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return [found[q] for q in queries]

    def _post(self, queries: list[str], k: int) -> list[list[Passage]]:
        body = json.dumps({"queries": queries, "topk": k, "return_scores": True}).encode()
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            self.requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    reply = response.read()
            except urllib.error.HTTPError as err:
                failure = f"HTTP {err.code} {_server_message(err)}"
                if err.code < 500:  # the request itself is wrong: sending it again will not help
                    break
                continue
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as err:
                reason = getattr(err, "reason", err)
                timed_out = isinstance(reason, (socket.timeout, TimeoutError))
                failure = f"no reply within {self.timeout_s:g} s" if timed_out else f"cannot connect ({reason})"
                continue
            except (http.client.HTTPException, UnicodeError, ValueError) as err:  # not HTTP, a reply cut short
                failure = f"no usable reply ({type(err).__name__}: {err})"
                continue
            return self._parse(reply, len(queries))
        tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
        raise RetrieverError(f"retriever at {self.url}: {failure} after {tries}; is a retrieval server running "
                             f"there (tmem-rl serve-retriever --corpus corpus.jsonl --port N)?")

    def _parse(self, reply: bytes, expected: int) -> list[list[Passage]]:
        try:
            data = json.loads(reply)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RetrieverError(f"retriever at {self.url}: the reply is not JSON ({err}); expected "
                                 f'{{"result": [[{{"document": {{"id", "contents"}}, "score"}}, ...], ...]}}') from err
        result = data.get("result") if isinstance(data, dict) else None
        if not isinstance(result, list) or len(result) != expected:
            raise RetrieverError(f"retriever at {self.url}: expected a reply with \"result\", a list of {expected} "
                                 f"list(s) of passages, got {shortened(data)}")
        return [[self._hit(hit) for hit in hits] if isinstance(hits, list) else self._malformed(hits)
                for hits in result]

    def _hit(self, hit: Any) -> Passage:
        # With scores a hit is {"document": {...}, "score": s}; some servers send the bare document.
        document, score = (hit.get("document"), hit.get("score", 0.0)) if isinstance(hit, dict) and "document" in hit \
            else (hit, 0.0)
        if not isinstance(document, dict) or not isinstance(document.get("contents"), str) \
                or isinstance(score, bool) or not isinstance(score, (int, float)):
            self._malformed(hit)
        return Passage(str(document.get("id", "")), document["contents"], float(score))

    def _malformed(self, value: Any):
        raise RetrieverError(f"retriever at {self.url}: a result is not a passage "
                             f'({{"document": {{"id", "contents"}}, "score"}}): {shortened(value)}')


def _server_message(err: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(err.read()).get("error", "")
    except (ValueError, AttributeError, OSError, http.client.HTTPException):
        detail = ""
    return f"({detail})" if detail else f"({err.reason})"
