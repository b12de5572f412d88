"""Retrievers: the in-process BM25 corpus index, the retrieval server it ships with, and the HTTP client, including
a server that is down, slow, or replies with something else than the protocol."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tmem_rl.errors import InputError
from tmem_rl.retrieval.client import HTTPRetriever
from tmem_rl.retrieval import make_retriever
from tmem_rl.retrieval.corpus import CorpusIndex, Passage, RetrieverError, read_corpus, titled
from tmem_rl.retrieval.server import RetrievalServer

PASSAGES = [
    Passage("p0", titled("Paris", "Paris is the capital of France. It lies on the Seine.")),
    Passage("p1", titled("Berlin", "Berlin is the capital of Germany. Its zoo is the oldest in the country.")),
    Passage("p2", titled("Zoo", "A zoo keeps animals for people to see.")),
    Passage("p3", titled("Seine", "The Seine is a river in the north of France.")),
]


@pytest.fixture(scope="module")
def index():
    return CorpusIndex(PASSAGES)


@pytest.fixture
def server(index):
    with RetrievalServer(index, port=0) as running:
        yield running


def _post(url, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# ---- the index ------------------------------------------------------------------------------------------------


def test_bm25_ranks_the_passage_with_the_query_words_first(index):
    capital, river, nothing = index.search(["capital of Germany", "which river is in France", "xylophone"], 2)
    assert [p.id for p in capital] == ["p1", "p0"]  # both say "capital"; only Berlin says Germany
    assert river[0].id == "p3" and river[0].title == "Seine"
    assert capital[0].score > capital[1].score > 0
    assert nothing == []  # a passage sharing no word with the query is not a result
    assert index.search([], 3) == [] and index.search(["zoo"], 0) == [[]]
    with_empty = CorpusIndex([Passage("e", ""), *PASSAGES])
    assert with_empty.search(["xylophone"], 3) == [[]]  # unknown words do not match the empty passage
    assert len(index.search(["zoo"], 50)[0]) == 2  # k beyond the corpus: what matches


def test_corpus_file_and_its_errors(tmp_path):
    good = tmp_path / "corpus.jsonl"
    good.write_text("\n".join(json.dumps(p.document()) for p in PASSAGES) + "\n\n")
    assert read_corpus(good) == PASSAGES
    assert CorpusIndex.from_jsonl(good).search(["zoo animals"], 1)[0][0].id == "p2"
    for line, says in [("[1, 2]", "expected an object"), ('{"id": 1}', "field 'contents' must be a string"),
                       ('{"contents": "x"}', "field 'id' must be a string or a number"), ("{oops", "not valid JSON")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(PASSAGES[0].document()) + "\n" + line + "\n")
        with pytest.raises(InputError, match=rf"bad.jsonl, line 2: {says}"):
            read_corpus(bad)
    with pytest.raises(InputError, match="missing.jsonl: cannot read the file"):
        read_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="empty.jsonl: no lines"):
        read_corpus(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"id": 1, "contents": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(InputError, match="latin1.jsonl: cannot read the file"):
        read_corpus(tmp_path / "latin1.jsonl")
    # A line ends at a newline only: U+2028 inside a JSON string is text.
    (tmp_path / "separator.jsonl").write_text(json.dumps({"id": 1, "contents": "a\u2028b"}, ensure_ascii=False))
    assert read_corpus(tmp_path / "separator.jsonl") == [Passage("1", "a\u2028b")]


def test_make_retriever_specs(tmp_path, server):
    assert isinstance(make_retriever(None, "env", PASSAGES), CorpusIndex)
    with pytest.raises(InputError, match="has no passages of its own"):
        make_retriever({"kind": "bm25"}, "env")
    with pytest.raises(InputError, match="kind one of bm25, http"):
        make_retriever({"kind": "faiss"}, "env")
    with pytest.raises(InputError, match="takes url"):
        make_retriever({"kind": "http", "url": server.url, "timeout": 3}, "env")
    with pytest.raises(InputError, match="corpus must be the path of a JSONL file"):
        make_retriever({"kind": "bm25", "corpus": None}, "env")
    for url in ("http://[::1", "http://host:80a/retrieve", "ftp://host/x", "localhost:8000"):
        with pytest.raises(InputError, match="retriever: url"):
            make_retriever({"kind": "http", "url": url}, "env")
    assert isinstance(make_retriever({"kind": "http", "url": server.url}, "env"), HTTPRetriever)


# ---- the server -------------------------------------------------------------------------------------------------


def test_server_speaks_the_protocol(server, index):
    status, reply = _post(server.url, {"queries": ["capital of Germany", "zoo"], "topk": 2, "return_scores": True})
    assert status == 200 and len(reply["result"]) == 2
    expected = index.search(["capital of Germany", "zoo"], 2)
    for hits, want in zip(reply["result"], expected):
        assert [(h["document"]["id"], h["document"]["contents"]) for h in hits] == [(p.id, p.contents) for p in want]
        assert [h["score"] for h in hits] == pytest.approx([p.score for p in want])
    status, reply = _post(server.url, {"queries": ["zoo"]})  # no topk: the server's default (3); no scores
    assert status == 200 and set(reply["result"][0][0]) == {"id", "contents"}
    with urllib.request.urlopen(server.url.replace("/retrieve", "/health"), timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok", "passages": 4}


@pytest.mark.parametrize("body, says", [
    ({"queries": "zoo"}, "field 'queries' must be a list of strings"),
    ({"queries": ["zoo"], "topk": 0}, "field 'topk' must be an integer between 1"),
    ({"queries": ["zoo"], "return_scores": "yes"}, "field 'return_scores' must be true or false"),
    ([1, 2], "expected a JSON object"),
])
def test_server_names_what_is_wrong_with_a_request(server, body, says):
    status, reply = _post(server.url, body)
    assert status == 400 and says in reply["error"]


def test_server_refuses_bad_json_and_other_paths(server):
    status, reply = _post(server.url, b"{not json", raw=True)
    assert status == 400 and reply["error"]
    status, reply = _post(server.url.replace("/retrieve", "/search"), {"queries": []})
    assert status == 404


@pytest.mark.parametrize("length, status, says", [("abc", 411, "needs a Content-Length"),
                                                  ("-5", 411, "needs a Content-Length"),
                                                  (str(2**30), 413, f"request of {2**30} bytes")])
def test_server_refuses_a_bad_length_and_closes_the_connection(server, length, status, says):
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(server.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    connection.putrequest("POST", "/retrieve")
    connection.putheader("Content-Length", length)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == status and says in json.loads(response.read())["error"]
    assert response.getheader("Connection") == "close"
    connection.close()
    assert _post(server.url, {"queries": ["zoo"]})[0] == 200  # the server is still up


def test_serve_retriever_command_starts_answers_and_stops(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(p.document()) for p in PASSAGES))
    process = subprocess.Popen([sys.executable, "-m", "tmem_rl.cli", "serve-retriever", "--corpus", str(corpus),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 120)  # a server that never starts fails, not hangs
        assert ready, "serve-retriever printed nothing within 120 s"
        line = process.stdout.readline()
        assert line.startswith("serving 4 passages"), line + process.stderr.read()
        url = line.split(" at ")[1].split()[0]
        assert HTTPRetriever(url).search(["zoo"], 1)[0][0].id == "p2"
    finally:
        process.terminate()
        process.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "tmem_rl.cli", "serve-retriever", "--corpus",
                          str(tmp_path / "none.jsonl")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "none.jsonl: cannot read the file" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    port = subprocess.run([sys.executable, "-m", "tmem_rl.cli", "serve-retriever", "--corpus", str(corpus),
                           "--port", "70000"], capture_output=True, text=True, timeout=120)
    assert port.returncode == 2 and "--port must be between 0 and 65535" in port.stderr


# ---- the client ---------------------------------------------------------------------------------------------------


def _same(got, want):
    assert [[(p.id, p.contents) for p in hits] for hits in got] == [[(p.id, p.contents) for p in hits] for hits in want]
    assert [[p.score for p in hits] for hits in got] == [[pytest.approx(p.score) for p in hits] for hits in want]


def test_client_equals_the_index_batches_and_caches(server, index):
    client = HTTPRetriever(server.url, cache_size=2)
    queries = ["capital of Germany", "zoo", "capital of Germany", "river"]
    _same(client.search(queries, 2), index.search(queries, 2))
    assert client.requests == 1  # one request for the batch, its repeated query asked once
    _same(client.search(["zoo", "Seine"], 2), index.search(["zoo", "Seine"], 2))
    assert client.requests == 2  # only "Seine" was new
    client.search(["zoo"], 2)
    assert client.requests == 2
    # The cache holds 2 queries and drops the least recently used: "zoo" was just used, "Seine" goes.
    client.search(["Paris"], 2)
    client.search(["zoo"], 2)
    assert client.requests == 3
    client.search(["Seine"], 2)
    assert client.requests == 4


def test_client_names_a_server_that_is_down():
    url = _closed_url()
    client = HTTPRetriever(url, retries=2, backoff_s=0.01)
    started = time.perf_counter()
    with pytest.raises(RetrieverError, match=rf"retriever at {url}: cannot connect .* after 3 tries; is a "
                                             r"retrieval server running"):
        client.search(["zoo"], 2)
    assert time.perf_counter() - started < 10 and client.requests == 3
    with pytest.raises(InputError, match="cannot connect"):  # the recipe's retriever is checked at once
        make_retriever({"kind": "http", "url": url, "retries": 0}, "env")


class _Stub(BaseHTTPRequestHandler):
    """A server that misbehaves as told by the class attributes."""

    delay = 0.0
    body = b"{}"
    status = 200
    seen = 0

    def do_POST(self):
        type(self).seen += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(self.delay)
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def _closed_url() -> str:
    """A URL on which nothing listens: a port the OS just gave out and took back (another process could take it
    in between; a refused or a failed connection both make the test's point)."""
    probe = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    port = probe.server_address[1]
    probe.server_close()
    return f"http://127.0.0.1:{port}/retrieve"


@pytest.fixture
def stub():
    handler = type("Handler", (_Stub,), {})
    http = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    http.daemon_threads = True
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{http.server_address[1]}/retrieve"
    http.shutdown()
    http.server_close()


def test_client_gives_up_on_a_slow_server_within_its_timeout(stub):
    handler, url = stub
    handler.delay, handler.body = 1.0, json.dumps({"result": [[]]}).encode()
    client = HTTPRetriever(url, timeout_s=0.2, retries=1, backoff_s=0.01)
    started = time.perf_counter()
    with pytest.raises(RetrieverError, match=r"no reply within 0.2 s after 2 tries"):
        client.search(["zoo"], 1)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("body, says", [
    (b"<html>", "the reply is not JSON"),
    (json.dumps({"results": []}).encode(), 'expected a reply with "result", a list of 1 list'),
    (json.dumps({"result": [[{"document": {"id": 1}, "score": 1.0}]]}).encode(), "a result is not a passage"),
    (json.dumps({"result": [["text"]]}).encode(), "a result is not a passage"),
])
def test_client_names_a_malformed_reply(stub, body, says):
    handler, url = stub
    handler.body = body
    with pytest.raises(RetrieverError, match=says):
        HTTPRetriever(url, retries=0).search(["zoo"], 1)


def test_client_retries_server_errors_but_not_bad_requests(stub):
    handler, url = stub
    handler.status, handler.body = 503, json.dumps({"error": "warming up"}).encode()
    with pytest.raises(RetrieverError, match=r"HTTP 503 \(warming up\) after 3 tries"):
        HTTPRetriever(url, retries=2, backoff_s=0.01).search(["zoo"], 1)
    assert handler.seen == 3
    handler.status, handler.seen = 400, 0
    with pytest.raises(RetrieverError, match=r"HTTP 400 \(warming up\) after 1 try"):
        HTTPRetriever(url, retries=2, backoff_s=0.01).search(["zoo"], 1)
    assert handler.seen == 1


def test_client_names_a_reply_that_is_not_http():
    raw = type("Raw", (_Stub,), {"do_POST": lambda self: (self.rfile.read(int(self.headers["Content-Length"])),
                                                         self.wfile.write(b"garbage\r\n\r\n"))})
    http = ThreadingHTTPServer(("127.0.0.1", 0), raw)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(RetrieverError, match="no usable reply"):
            HTTPRetriever(f"http://127.0.0.1:{http.server_address[1]}/retrieve", retries=0).search(["q"], 1)
    finally:
        http.shutdown()
        http.server_close()


def test_client_accepts_bare_documents(stub):
    handler, url = stub
    handler.body = json.dumps({"result": [[{"id": "a", "contents": "x"}]]}).encode()
    assert HTTPRetriever(url).search(["q"], 1) == [[Passage("a", "x", 0.0)]]
