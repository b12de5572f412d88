"""A retrieval server: `tmem-rl serve-retriever --corpus corpus.jsonl --port 8000`.

It serves a BM25 index (`CorpusIndex`) over the Search-R1 protocol that `HTTPRetriever` speaks, so a recipe points
at it as at any other such server: POST /retrieve `{"queries": [...], "topk": k, "return_scores": true}` ->
`{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}`; GET /health -> `{"status": "ok",
"passages": N}`. A bad request gets status 400 and `{"error": "..."}` naming the field. One thread per connection
(the standard library's threading server): the rollouts of a batch may query at once.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tmem_rl.retrieval.corpus import CorpusIndex, shortened

MAX_REQUEST_BYTES = 16 * 2**20
MAX_QUERIES = 4096
MAX_TOPK = 1000


class RetrievalServer:
    """The index behind an HTTP server on (host, port); port 0 takes a free one (`url` says which)."""

    def __init__(self, index: CorpusIndex, host: str = "127.0.0.1", port: int = 8000, default_topk: int = 3):
        self.index = index
        self.default_topk = default_topk
        handler = type("Handler", (_Handler,), {"server_state": self})
        self._http = ThreadingHTTPServer((host, port), handler)
        self._http.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}/retrieve"

    def serve_forever(self) -> None:
        self._http.serve_forever()

    def start(self) -> "RetrievalServer":
        """Serve from a background thread (tests, notebooks); `close` stops it."""
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
        self._http.server_close()

    def __enter__(self) -> "RetrievalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def answer(self, request: Any) -> dict[str, Any]:
        """The reply to one decoded request body; a ValueError names what is wrong with it."""
        if not isinstance(request, dict):
            raise ValueError('expected a JSON object {"queries": [...], "topk": k, "return_scores": bool}')
        queries = request.get("queries")
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise ValueError(f"field 'queries' must be a list of strings, got {shortened(queries, 60)}")
        if len(queries) > MAX_QUERIES:
            raise ValueError(f"field 'queries' holds {len(queries)} queries; at most {MAX_QUERIES} per request")
        topk = request.get("topk")
        topk = self.default_topk if topk is None else topk
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
            raise ValueError(f"field 'topk' must be an integer between 1 and {MAX_TOPK}, got {shortened(topk, 60)}")
        scores = request.get("return_scores", False)
        if not isinstance(scores, bool):
            raise ValueError(f"field 'return_scores' must be true or false, got {shortened(scores, 60)}")
        results = self.index.search(queries, topk)
        if scores:
            return {"result": [[{"document": p.document(), "score": p.score} for p in hits] for hits in results]}
        return {"result": [[p.document() for p in hits] for hits in results]}


class _Handler(BaseHTTPRequestHandler):
    server_state: RetrievalServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a connection may sit idle or send slowly before its thread gives up on it

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._reply(200, {"status": "ok", "passages": len(self.server_state.index)})
        else:
            self._refuse(404, f"no such path {self.path!r}; POST /retrieve or GET /health")

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/retrieve":
            self._refuse(404, f"no such path {self.path!r}; POST /retrieve")
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self._refuse(411, f"a request needs a Content-Length of 0 or more bytes, got {length!r}")
            return
        if int(length) > MAX_REQUEST_BYTES:
            self._refuse(413, f"request of {length} bytes; at most {MAX_REQUEST_BYTES}")
            return
        try:
            request = json.loads(self.rfile.read(int(length)) or b"null")
            reply = self.server_state.answer(request)
        except (ValueError, RecursionError) as err:  # bad JSON (a JSONDecodeError is one) or a bad field
            self._reply(400, {"error": str(err) or type(err).__name__})
        except Exception as err:  # noqa: BLE001  (the server must answer, and stay up, whatever a request does)
            self._reply(500, {"error": f"{type(err).__name__}: {err}"})
        else:
            self._reply(200, reply)

    def _refuse(self, status: int, message: str) -> None:
        # The body was not read: close the connection, or its bytes would be taken for the next request.
        self.close_connection = True
        self._reply(status, {"error": message})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # one line per request would drown a training log
        pass
