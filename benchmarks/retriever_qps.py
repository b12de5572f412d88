"""Retriever speed: build time and queries per second of BM25 over a large corpus, in process and over HTTP.

Side by side on one corpus of N passages (default 100K): rank_bm25 (what `BM25Index` uses for the few texts of
one episode), bm25s (`CorpusIndex`, what `tmem-rl serve-retriever` serves and search tools query in process), and
the same bm25s index behind the retrieval server on 127.0.0.1, queried by `HTTPRetriever` one query per request
and in batches. Also whether the top passages agree between the two libraries (both BM25, with their own idf and
parameters: rank_bm25's Okapi k1 1.5, b 0.75; bm25s's Lucene k1 0.9, b 0.4, as Pyserini).

The corpus: documents of the `search` environment's generated worlds (~150 words each, 100 per world, every world
with its own coined names), and queries: the worlds' own questions. Real text differs in vocabulary; the sizes and
the cost of a query per passage are what this measures.

    python benchmarks/retriever_qps.py                    # 100K passages: ~2 minutes on 2 cores
    python benchmarks/retriever_qps.py --passages 1000000
    python benchmarks/retriever_qps.py --quick            # 5K passages: seconds
"""

from __future__ import annotations

import argparse
import json
import time

from _quick import parse_args  # noqa: E402  (benchmarks/ is on the path when a script here runs)

from tmem_rl.envs.search import SearchEnv
from tmem_rl.retrieval import BM25Index
from tmem_rl.retrieval.client import HTTPRetriever
from tmem_rl.retrieval.corpus import CorpusIndex, Passage
from tmem_rl.retrieval.server import RetrievalServer

PER_WORLD = 100


def corpus_and_queries(passages: int, queries: int) -> tuple[list[Passage], list[str]]:
    worlds = max(1, passages // PER_WORLD)
    env = SearchEnv(num_tasks=worlds, num_entities=PER_WORLD, k=4)
    corpus, asked = [], []
    for i in range(worlds):
        task = env.task(i)
        corpus += [Passage(f"{i}-{j}", text) for j, text in enumerate(env.documents(task))]
        asked += task.metadata["sub_questions"]
    step = max(1, len(asked) // queries)
    return corpus[:passages], asked[::step][:queries]


def per_second(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200, help="queries timed per bm25s / HTTP measurement")
    parser.add_argument("--rank-bm25-queries", type=int, default=20,
                        help="queries timed for rank_bm25, whose query scores every passage in Python")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="queries per HTTP request in the batched run")
    args = parse_args(parser, {"passages": 5000, "queries": 40, "rank_bm25_queries": 10}, argv)

    corpus, queries = corpus_and_queries(args.passages, args.queries)
    texts = [p.contents for p in corpus]
    result = {"passages": len(corpus), "queries": len(queries), "top_k": args.top_k, "quick": args.quick}

    started = time.perf_counter()
    okapi = BM25Index(texts)
    result["rank_bm25_build_s"] = round(time.perf_counter() - started, 2)
    few = queries[: args.rank_bm25_queries]
    started = time.perf_counter()
    okapi_top = [okapi.ranked(q, args.top_k) for q in few]
    result["rank_bm25_qps"] = per_second(len(few), time.perf_counter() - started)

    started = time.perf_counter()
    index = CorpusIndex(corpus)
    result["bm25s_build_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    local = index.search(queries, args.top_k)
    result["bm25s_qps_batched"] = per_second(len(queries), time.perf_counter() - started)
    started = time.perf_counter()
    for q in queries:
        index.search([q], args.top_k)
    result["bm25s_qps_one_by_one"] = per_second(len(queries), time.perf_counter() - started)
    positions = {p.id: i for i, p in enumerate(corpus)}
    agree = [okapi_top[i][0] == positions[local[i][0].id] for i in range(len(few)) if local[i] and okapi_top[i]]
    result["top1_agreement_rank_bm25_vs_bm25s"] = round(sum(agree) / len(agree), 3) if agree else None

    with RetrievalServer(index, port=0) as server:
        client = HTTPRetriever(server.url, cache_size=0)
        started = time.perf_counter()
        remote = [client.search([q], args.top_k)[0] for q in queries]
        result["http_qps_one_per_request"] = per_second(len(queries), time.perf_counter() - started)
        started = time.perf_counter()
        for begin in range(0, len(queries), args.batch):
            client.search(queries[begin:begin + args.batch], args.top_k)
        result["http_qps_batched"] = per_second(len(queries), time.perf_counter() - started)
        result["http_equals_in_process"] = remote == local
    result["batch"] = args.batch
    result["bm25s_over_rank_bm25_qps"] = round(result["bm25s_qps_one_by_one"] / result["rank_bm25_qps"], 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
