"""Any `datasets` source as a stream QA environment, by naming its columns in the recipe.

    env:
      name: dataset
      kwargs:
        path: json                     # datasets.load_dataset's first argument: a builder (json, csv, parquet),
        data_files: data/qa.jsonl      #   a local folder or a hub id
        split: train
        columns: {question: question, context: context, answers: answers}   # optional: id, category,
        chunk_by: lines                # lines | turns | words | tokens       # reference_pairs
        chunk_size: 8                  # lines / turns / words / tokens per chunk
        metric: f1                     # f1 | em | hotpotqa

The context column holds the text to read: a string (chunked by lines, words, or tokens of `tokenizer`), or a list
of passages / turns (strings, or {"speaker", "text"} dicts; chunked by turns). Answers: a string, a list of
accepted strings, or SQuAD's {"text": [...]}. Reference pairs (for the warm start): a list of {"instruction",
"output"} or [question, answer]. In Python, `DatasetEnv(dataset=ds, columns=...)` takes a `datasets.Dataset`.
A column that is missing or holds the wrong type is an error naming it and the row.
"""

from __future__ import annotations

from typing import Any

from tmem_rl.envs import register_env
from tmem_rl.envs.base import Environment, Task
from tmem_rl.errors import InputError, did_you_mean
from tmem_rl.metrics.qa import best_over_golds, exact_match, hotpotqa_f1, token_f1
from tmem_rl.records import QAPair

COLUMN_ROLES = ("question", "context", "answers", "id", "category", "reference_pairs")
REQUIRED_ROLES = ("question", "context", "answers")
CHUNK_BY = ("lines", "turns", "words", "tokens")
METRICS = {"f1": token_f1, "em": exact_match, "hotpotqa": hotpotqa_f1}


@register_env("dataset")
class DatasetEnv(Environment):
    """One task per row: read the context in chunks with the question in mind, then answer it."""

    name = "dataset"

    def __init__(self, *, path: str | None = None, data_files: Any = None, name: str | None = None,
                 split: str = "train", dataset: Any = None, columns: dict[str, str] | None = None,
                 chunk_by: str = "lines", chunk_size: int = 8, metric: str = "f1", tokenizer: str | None = None,
                 num_tasks: int | None = None, l_max: int | None = None):
        self.where = f"dataset env ({path or 'a Dataset'})"
        if chunk_by not in CHUNK_BY:
            raise InputError(f"{self.where}: chunk_by must be one of {', '.join(CHUNK_BY)}, got {chunk_by!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise InputError(f"{self.where}: chunk_size must be an integer >= 1, got {chunk_size!r}")
        if metric not in METRICS:
            raise InputError(f"{self.where}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if chunk_by == "tokens" and not tokenizer:
            raise InputError(f"{self.where}: chunk_by tokens needs tokenizer (an HF folder or hub id) to count them")
        if l_max is not None and (isinstance(l_max, bool) or not isinstance(l_max, int) or l_max < 1):
            raise InputError(f"{self.where}: l_max must be None or an integer >= 1, got {l_max!r}")
        self.default_l_max = l_max
        self.chunk_by, self.chunk_size, self.metric = chunk_by, chunk_size, metric
        self.dataset = self._load(path, data_files, name, split, dataset)
        self.columns = self._columns(columns or {})
        if num_tasks is not None and (isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1):
            raise InputError(f"{self.where}: num_tasks must be None or an integer >= 1, got {num_tasks!r}")
        self.num_tasks = min(len(self.dataset), num_tasks or len(self.dataset))
        self._tokenizer = None
        if chunk_by == "tokens":
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.split_name = split

    def _load(self, path, data_files, name, split, dataset):
        import datasets

        if (path is None) == (dataset is None):
            raise InputError(f"{self.where}: give exactly one of path (a datasets.load_dataset source) and dataset "
                             f"(a datasets.Dataset)")
        if dataset is not None:
            if not isinstance(dataset, datasets.Dataset):
                raise InputError(f"{self.where}: dataset must be a datasets.Dataset, got {type(dataset).__name__}")
            return dataset
        try:
            return datasets.load_dataset(path, name=name, data_files=data_files, split=split)
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetsError) as err:
            # A malformed file's own cause is the most telling line: datasets wraps it.
            cause = err.__cause__ or err
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise InputError(f"{self.where}: datasets.load_dataset(path={path!r}, data_files={data_files!r}, "
                             f"split={split!r}) failed: {first}") from err

    def _columns(self, given: dict[str, str]) -> dict[str, str]:
        if not isinstance(given, dict):
            raise InputError(f"{self.where}: columns must map roles ({', '.join(COLUMN_ROLES)}) to column names, "
                             f"got {given!r}")
        unknown = [role for role in given if role not in COLUMN_ROLES]
        if unknown:
            hint = did_you_mean(unknown[0], COLUMN_ROLES)
            raise InputError(f"{self.where}: columns: unknown role {unknown[0]!r}{hint}; roles: "
                             f"{', '.join(COLUMN_ROLES)}")
        have = list(self.dataset.column_names)
        columns = {}
        for role in COLUMN_ROLES:
            column = given.get(role, role if role in REQUIRED_ROLES or role in have else None)
            if column is None:
                continue
            if column not in have:
                raise InputError(f"{self.where}: column {column!r} (columns.{role}) is not in the dataset"
                                 f"{did_you_mean(column, have)}; its columns: {', '.join(have)}")
            columns[role] = column
        return columns

    def __len__(self) -> int:
        return self.num_tasks

    def task(self, index: int) -> Task:
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"{self.where}: task index {index} out of range [0, {self.num_tasks})")
        row = self.dataset[index]
        where = f"{self.where}: row {index}"
        col = self.columns
        question = row[col["question"]]
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"{where}: column {col['question']!r} (question) must be a non-empty string, got "
                             f"{question!r}")
        metadata: dict[str, Any] = {"index": index}
        if "category" in col and row[col["category"]] is not None:
            metadata["category"] = str(row[col["category"]])
        return Task(
            task_id=str(row[col["id"]]) if "id" in col else f"{self.split_name}-{index}",
            question=question.strip(),
            chunks=tuple(self._chunks(where, row[col["context"]])),
            answers=_answers(where, col["answers"], row[col["answers"]]),
            metadata=metadata,
            reference_pairs=_pairs(where, col["reference_pairs"], row[col["reference_pairs"]])
            if "reference_pairs" in col else ())

    def score(self, task: Task, prediction: str) -> dict[str, float]:
        f1_of = METRICS["hotpotqa" if self.metric == "hotpotqa" else "f1"]
        f1 = best_over_golds(f1_of, prediction, task.answers)
        em = best_over_golds(exact_match, prediction, task.answers)
        return {"reward": em if self.metric == "em" else f1, "f1": f1, "em": em}

    def _chunks(self, where: str, context: Any) -> list[str]:
        column = f"column {self.columns['context']!r} (context)"
        if self.chunk_by == "turns":
            if not isinstance(context, list):
                raise InputError(f"{where}: {column} must be a list of turns or passages with chunk_by turns, got "
                                 f"{type(context).__name__}")
            units = [_turn(where, column, item) for item in context]
            separator = "\n"
        else:
            if not isinstance(context, str):
                raise InputError(f"{where}: {column} must be a string with chunk_by {self.chunk_by}, got "
                                 f"{type(context).__name__} (a list of turns: chunk_by turns)")
            if self.chunk_by == "lines":
                units, separator = [line for line in context.splitlines() if line.strip()], "\n"
            elif self.chunk_by == "words":
                units, separator = context.split(), " "
            else:
                ids = self._tokenizer(context, add_special_tokens=False)["input_ids"]
                return [self._tokenizer.decode(ids[i:i + self.chunk_size])
                        for i in range(0, len(ids), self.chunk_size)]
        n = self.chunk_size
        return [separator.join(units[i:i + n]) for i in range(0, len(units), n)]


def _turn(where: str, column: str, item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        speaker = item.get("speaker")
        return f"{speaker}: {item['text']}" if isinstance(speaker, str) and speaker else item["text"]
    raise InputError(f"{where}: {column}: a turn must be a string or {{speaker, text}}, got {item!r}")


def _answers(where: str, column: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, dict) and "text" in value:  # SQuAD: {"text": [...], "answer_start": [...]}
        value = value["text"]
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        raise InputError(f"{where}: column {column!r} (answers) must be a string, a number or a non-empty list of "
                         f"them (or SQuAD's {{text: [...]}}), got {value!r}")
    return tuple(str(v).strip() for v in value)


def _pairs(where: str, column: str, value: Any) -> tuple[QAPair, ...]:
    if value is None:
        return ()
    pairs = []
    for item in value if isinstance(value, list) else [None]:
        if isinstance(item, dict) and isinstance(item.get("instruction"), str) and isinstance(item.get("output"), str):
            pairs.append(QAPair(item["instruction"], item["output"]))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            pairs.append(QAPair(*item))
        else:
            raise InputError(f"{where}: column {column!r} (reference_pairs) must be a list of {{instruction, "
                             f"output}} or [question, answer], got {value!r}")
    return tuple(pairs)
