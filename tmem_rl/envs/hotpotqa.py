"""HotpotQA questions asked k at once, answered by searching: MEM1's multi-objective QA on real text.

A task composes k HotpotQA questions (a seeded shuffle of the file, cut into groups of k: each question is asked
once, so tasks share no question and the train / held-out split is disjoint in questions). The agent searches a
corpus with the `search` tool and answers all k in one line, `a1; a2; ...`. The corpus is, by default, the union of
the k questions' own paragraphs (10 each in the distractor setting: 2 gold, 8 distractors), ranked by BM25 in this
process; `retriever` names another: a JSONL corpus ({kind: bm25, corpus: wiki.jsonl}) or a retrieval server
({kind: http, url: http://host:8000/retrieve}), as Search-R1 and MEM1 users run one.

Answers are scored with the official HotpotQA normalization (`tmem_rl.metrics.qa.hotpotqa_f1`); each answer is
matched to one question. Metrics: mean F1 / EM (F1 is the reward), F1 per objective (`f1_q1` ...), and, as a
diagnostic, the share of the questions' supporting paragraphs that the episode's searches returned
(`support_recall`) and the searches that failed (`search_failures`: a server down or too slow; the episode goes on).
The file is the Hugging Face `hotpot_qa` layout (`context` = {"title": [...], "sentences": [[...]]}) or the
original release's (`context` = [[title, [sentences]], ...]); both also as JSONL.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmem_rl.envs import read_json_list, read_jsonl, register_env, text_field
from tmem_rl.envs.base import Action, ActionKind, EpisodeState, Observation, StepResult, Task
from tmem_rl.envs.search import MultiQuestionSearch, ask_all, search_tool
from tmem_rl.errors import InputError
from tmem_rl.metrics.qa import hotpotqa_f1, mean
from tmem_rl.records import QAPair
from tmem_rl.retrieval import bm25_tokens, make_retriever
from tmem_rl.retrieval.corpus import Passage, Retriever, RetrieverError, titled


class HotpotQAFormatError(InputError):
    """A HotpotQA file that is not in either layout; the message names the file, the record and the field."""


@dataclass(frozen=True)
class HotpotRecord:
    id: str
    question: str
    answer: str
    type: str
    level: str
    supporting_titles: tuple[str, ...]
    paragraphs: tuple[tuple[str, str], ...]  # (title, text)


def load_hotpotqa(path: str | Path) -> list[HotpotRecord]:
    """Every record of a HotpotQA file (a JSON list, or JSONL), in either layout; the first malformed record stops
    the load with one line naming it."""
    name = str(path)
    if name.endswith(".jsonl"):
        raw = [item for _, item in read_jsonl(path, "HotpotQA questions", HotpotQAFormatError)]
    else:
        raw = read_json_list(path, "questions", "HotpotQA", HotpotQAFormatError)
    return [_record(f"{name}: record {i}", i, item) for i, item in enumerate(raw)]


def _record(where: str, index: int, item: Any) -> HotpotRecord:
    if not isinstance(item, dict):
        raise HotpotQAFormatError(f"{where}: expected an object with question, answer, context, supporting_facts, "
                                  f"got {type(item).__name__}")
    for key in ("question", "answer", "context"):
        if key not in item:
            raise HotpotQAFormatError(f"{where}: missing field '{key}'")
    question = text_field(where, "question", item["question"], HotpotQAFormatError)
    answer = text_field(where, "answer", item["answer"], HotpotQAFormatError)
    return HotpotRecord(
        id=str(item.get("id", item.get("_id", f"hotpotqa-{index}"))), question=question.strip(),
        answer=answer.strip(), type=str(item.get("type", "")), level=str(item.get("level", "")),
        supporting_titles=_supporting_titles(where, item.get("supporting_facts", [])),
        paragraphs=_paragraphs(where, item["context"]))


def _paragraphs(where: str, context: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(context, dict):  # Hugging Face: {"title": [...], "sentences": [[...], ...]}
        titles, sentences = context.get("title"), context.get("sentences")
        if not isinstance(titles, list) or not isinstance(sentences, list) or len(titles) != len(sentences):
            raise HotpotQAFormatError(f"{where}: field 'context' must hold lists 'title' and 'sentences' of the "
                                      f"same length")
        pairs = list(zip(titles, sentences))
    elif isinstance(context, list):  # the original release: [[title, [sentences]], ...]
        if not all(isinstance(p, list) and len(p) == 2 for p in context):
            raise HotpotQAFormatError(f"{where}: field 'context' must be a list of [title, [sentences]] pairs")
        pairs = [tuple(p) for p in context]
    else:
        raise HotpotQAFormatError(f"{where}: field 'context' must be {{title, sentences}} or a list of "
                                  f"[title, [sentences]], got {type(context).__name__}")
    paragraphs = []
    for title, sentences in pairs:
        if not isinstance(title, str) or not isinstance(sentences, list) \
                or not all(isinstance(s, str) for s in sentences):
            raise HotpotQAFormatError(f"{where}: a context paragraph must be a title and a list of sentences, got "
                                      f"{title!r}")
        paragraphs.append((title, "".join(sentences).strip()))
    return tuple(paragraphs)


def _supporting_titles(where: str, facts: Any) -> tuple[str, ...]:
    if isinstance(facts, dict):  # Hugging Face: {"title": [...], "sent_id": [...]}
        titles = facts.get("title", [])
    elif isinstance(facts, list):  # the original release: [[title, sent_id], ...]
        titles = [f[0] if isinstance(f, list) and f else None for f in facts]
    else:
        titles = None
    if not isinstance(titles, list) or not all(isinstance(t, str) for t in titles):
        raise HotpotQAFormatError(f"{where}: field 'supporting_facts' must be {{title, sent_id}} or a list of "
                                  f"[title, sent_id]")
    return tuple(dict.fromkeys(titles))


@dataclass
class SearchState(EpisodeState):
    retrieved: set[str] = field(default_factory=set)  # titles of the passages the searches returned
    search_failures: int = 0
    prefetched: dict[str, list[Passage] | RetrieverError] = field(default_factory=dict)  # this turn's searches,
    # asked for in one batch by `prefetch`: query -> its passages, or why the batch failed


@register_env("hotpotqa")
class HotpotQAEnv(MultiQuestionSearch):
    """k HotpotQA questions per task, answered by searching; deterministic in (path, k, seed)."""

    name = "hotpotqa"
    summary_columns = ("support_recall", "search_failures")
    answer_f1 = staticmethod(hotpotqa_f1)

    def __init__(self, *, path: str, k: int = 2, num_tasks: int | None = None, top_k_docs: int = 3,
                 max_turns: int = 10, seed: int = 0, retriever: dict | None = None):
        for arg, value, low in (("k", k, 1), ("top_k_docs", top_k_docs, 1), ("max_turns", max_turns, 1),
                                ("seed", seed, None)):
            if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
                raise InputError(f"hotpotqa env: {arg} must be an integer{f' >= {low}' if low else ''}, got {value!r}")
        self.records = load_hotpotqa(path)
        available = len(self.records) // k
        if available == 0:
            raise InputError(f"hotpotqa env: {path} holds {len(self.records)} questions, fewer than k={k}")
        if num_tasks is not None and (not isinstance(num_tasks, int) or isinstance(num_tasks, bool)
                                      or not 1 <= num_tasks <= available):
            raise InputError(f"hotpotqa env: num_tasks must be None or between 1 and {available} (each of the "
                             f"{len(self.records)} questions is asked once, k={k} per task), got {num_tasks!r}")
        self.k, self.top_k_docs, self.max_turns, self.seed = k, top_k_docs, max_turns, seed
        self.tools = search_tool(top_k_docs)
        order = list(range(len(self.records)))
        random.Random(f"hotpotqa:{seed}").shuffle(order)
        self._groups = [order[i * k:(i + 1) * k] for i in range(num_tasks or available)]
        # One retriever for every task when the recipe names a corpus or server; else each task's own paragraphs.
        self._shared = None if retriever is None or retriever == {"kind": "bm25"} \
            else make_retriever(retriever, "hotpotqa env: retriever")
        self._own: dict[str, Retriever] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def task(self, index: int) -> Task:
        if not 0 <= index < len(self._groups):
            raise IndexError(f"hotpotqa env: task index {index} out of range [0, {len(self._groups)})")
        records = [self.records[i] for i in self._groups[index]]
        return Task(
            task_id=f"hotpotqa-{self.seed}-{index}", question=ask_all([r.question for r in records]), chunks=(),
            answers=("; ".join(r.answer for r in records),),
            reference_pairs=tuple(QAPair(r.question, r.answer) for r in records),
            metadata={"index": index, "k": self.k, "category": str(self.k), "record_ids": [r.id for r in records],
                      "sub_questions": [r.question for r in records], "sub_answers": [r.answer for r in records],
                      "supporting_titles": [list(r.supporting_titles) for r in records],
                      "types": [r.type for r in records]})

    def passages(self, task: Task) -> list[Passage]:
        """The task's own corpus: its questions' paragraphs, each title once."""
        records = [self.records[i] for i in self._groups[task.metadata["index"]]]
        unique = dict.fromkeys(p for r in records for p in r.paragraphs)
        return [Passage(title, titled(title, text)) for title, text in unique]

    def retriever(self, task: Task) -> Retriever:
        if self._shared is not None:
            return self._shared
        if task.task_id not in self._own:
            if len(self._own) >= 64:  # a batch touches a few tasks at a time
                self._own.pop(next(iter(self._own)))
            self._own[task.task_id] = make_retriever(None, "hotpotqa env", self.passages(task))
        return self._own[task.task_id]

    def reset(self, task: Task) -> tuple[EpisodeState, Observation]:
        return SearchState(task=task), Observation(kind="question", text=task.question)

    def prefetch(self, calls: list[tuple[EpisodeState, str, str]]) -> None:
        """The searches of a turn's rollouts in one batch per retriever (one round trip to a server); `call_tool`
        then takes each rollout's result from its state."""
        batches: dict[int, tuple[Retriever, list[SearchState]]] = {}
        for state, tool, argument in calls:
            if tool == "search" and bm25_tokens(argument) and isinstance(state, SearchState):
                retriever = self.retriever(state.task)
                batches.setdefault(id(retriever), (retriever, []))[1].append(state)
                state.prefetched[argument] = []  # filled below
        for retriever, states in batches.values():
            queries = list(dict.fromkeys(q for s in states for q in s.prefetched))
            try:
                found: dict[str, list[Passage] | RetrieverError] = dict(
                    zip(queries, retriever.search(queries, self.top_k_docs)))
            except RetrieverError as err:  # each rollout records the failure when its call runs
                found = dict.fromkeys(queries, err)
            for state in states:
                state.prefetched = {q: found[q] for q in state.prefetched}

    def call_tool(self, state: EpisodeState, tool: str, argument: str) -> str:
        if tool != "search":
            raise ValueError(f"environment {self.name!r} has no tool {tool!r}; tools: search")
        if not bm25_tokens(argument):
            return "The search query is empty: write the words to search for."
        prefetched = state.prefetched.pop(argument, None) if isinstance(state, SearchState) else None
        try:
            if isinstance(prefetched, RetrieverError):
                raise prefetched
            hits = prefetched if prefetched is not None else \
                self.retriever(state.task).search([argument], self.top_k_docs)[0]
        except RetrieverError as err:
            if isinstance(state, SearchState):
                state.search_failures += 1
            return f"The search failed ({err}). Try again or answer with what you have."
        if isinstance(state, SearchState):
            state.retrieved.update(p.title for p in hits)
        if not hits:
            return "No document matches the query."
        return "\n\n".join(f"[{rank}] {p.contents}" for rank, p in enumerate(hits, start=1))

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """F1 per objective (the i-th question of a task), supporting-paragraph recall and failed searches."""
        keys = [f"f1_q{i}" for i in range(1, self.k + 1)] + ["support_recall", "search_failures"]
        return {key: mean([float(r[key]) for r in records if key in r]) for key in keys}

    def step(self, state: EpisodeState, action: Action) -> StepResult:
        result = super().step(state, action)
        if action.kind == ActionKind.ANSWER and isinstance(state, SearchState):
            gold = {t for titles in state.task.metadata["supporting_titles"] for t in titles}
            if gold:  # a file without supporting facts has no recall to report
                result.info["support_recall"] = len(gold & state.retrieved) / len(gold)
            result.info["search_failures"] = float(state.search_failures)
        return result
