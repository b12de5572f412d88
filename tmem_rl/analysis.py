"""What a run wrote, back as a `datasets.Dataset` for analysis (filter, group, to_pandas).

    from tmem_rl.analysis import load_records
    records = load_records("runs/eval")          # an eval folder: results.jsonl, one row per answered question
    batch = load_records("runs/batch")           # a saved EpisodeBatch: trajectories.json, one row per rollout

Scalar fields are columns as written. Nested ones (extractions, segments, actions, metrics, ...) differ in shape from
row to row, which a column cannot hold, and so does a field that is text in one row and a number in another: those
columns are JSON text, `json.loads` gives each value back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tmem_rl.errors import InputError

SCALARS = (str, int, float, bool, type(None))


def load_records(path: str | Path):
    """The records of an eval folder or results / demo JSONL file, or the trajectories of a saved episode batch."""
    import datasets

    from tmem_rl.envs import read_json_file
    from tmem_rl.evaluation.harness import RESULTS, read_records

    path = Path(path)
    if (path / "trajectories.json").exists():
        rows = read_json_file(path / "trajectories.json", "a saved episode batch")
        if not isinstance(rows, dict) or not isinstance(rows.get("trajectories"), list) \
                or not all(isinstance(t, dict) for t in rows["trajectories"]):
            raise InputError(f"{path / 'trajectories.json'}: expected {{\"trajectories\": [...]}} as EpisodeBatch.save "
                             f"writes it")
        rows = rows["trajectories"]
    elif path.is_dir() and (path / RESULTS).exists():
        rows = read_records(path / RESULTS)
    elif path.is_file() and path.suffix == ".jsonl":
        rows = read_records(path)
    else:
        raise InputError(f"{path}: expected an eval folder (with {RESULTS}), a .jsonl of records, or a saved episode "
                         f"batch (with trajectories.json)")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    mixed = {key for key in columns if _mixed([row.get(key) for row in rows])}
    return datasets.Dataset.from_list([{key: _cell(row.get(key), key in mixed) for key in columns} for row in rows])


def _mixed(values: list[Any]) -> bool:
    """A column Arrow cannot type: nested values, or scalars of kinds that do not convert (text and numbers, a
    category 3 beside "3"; true beside 0.5). Ints and floats together are numbers."""
    kinds = {"number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__
             for v in values if v is not None}
    return len(kinds) > 1 or not all(isinstance(v, SCALARS) for v in values)


def _cell(value: Any, as_json: bool) -> Any:
    return json.dumps(value) if as_json and value is not None else value
