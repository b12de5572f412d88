"""A `datasets` source as an environment: mapped columns, chunking, scoring, clear errors, training and evaluation
on the tiny model, and what a run wrote loaded back as a Dataset."""

from __future__ import annotations

import json

import datasets
import pytest

from tmem_rl.envs import make_env
from tmem_rl.envs.dataset import DatasetEnv
from tmem_rl.envs.split import split_env
from tmem_rl.errors import InputError

ROWS = [
    {"qid": "r0", "q": "Where does Ana live?", "story": "Ana lives in Porto.\nBo likes tea.\nCy has a cat.\nDee rows.",
     "gold": ["Porto", "the city of Porto"], "kind": "city",
     "pairs": [{"instruction": "Where does Ana live?", "output": "Porto"}]},
    {"qid": "r1", "q": "What pet does Cy have?", "story": "Ana lives in Porto.\nCy has a cat.",
     "gold": ["a cat"], "kind": "pet", "pairs": [{"instruction": "What pet does Cy have?", "output": "a cat"}]},
    {"qid": "r2", "q": "What does Bo like?", "story": "Bo likes tea.\nAna lives in Porto.\nBo rides a bike.",
     "gold": ["tea"], "kind": "food", "pairs": [{"instruction": "What does Bo like?", "output": "tea"}]},
    {"qid": "r3", "q": "Who rows?", "story": "Dee rows on Sundays.\nCy has a cat.",
     "gold": ["Dee"], "kind": "person", "pairs": [{"instruction": "Who rows?", "output": "Dee"}]},
]
COLUMNS = {"question": "q", "context": "story", "answers": "gold", "id": "qid", "category": "kind",
           "reference_pairs": "pairs"}


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


def _env(data_file, **kwargs):
    return make_env("dataset", **{"path": "json", "data_files": str(data_file), "columns": COLUMNS, **kwargs})


def test_columns_map_to_tasks(data_file):
    env = _env(data_file, chunk_size=2)
    assert len(env) == 4
    task = env.task(0)
    assert (task.task_id, task.question, task.answers) == ("r0", "Where does Ana live?", ("Porto", "the city of Porto"))
    assert task.chunks == ("Ana lives in Porto.\nBo likes tea.", "Cy has a cat.\nDee rows.")
    assert task.metadata["category"] == "city" and task.reference_pairs[0].output == "Porto"
    # Scoring: the best of the accepted answers.
    assert env.score(task, "Porto")["f1"] == 1.0 and env.score(task, "city of Porto")["em"] == 1.0
    assert env.score(task, "Lisbon") == {"reward": 0.0, "f1": 0.0, "em": 0.0}
    assert _env(data_file, metric="em").score(task, "in Porto")["reward"] == 0.0  # em: exact or nothing
    assert _env(data_file).score(task, "in Porto")["reward"] == pytest.approx(2 / 3)


def test_default_column_names_and_a_dataset_given_in_python():
    ds = datasets.Dataset.from_list([{"question": "Who rows?", "context": ["Dee rows.", "Cy naps."],
                                      "answers": {"text": ["Dee"], "answer_start": [0]}, "id": 7}])
    env = DatasetEnv(dataset=ds, chunk_by="turns", chunk_size=1)
    task = env.task(0)
    assert (task.task_id, task.chunks, task.answers) == ("7", ("Dee rows.", "Cy naps."), ("Dee",))
    assert task.reference_pairs == () and "category" not in task.metadata


def test_chunking_by_turns_words_and_tokens(tiny, tmp_path):
    rows = datasets.Dataset.from_list([{"question": "Where?", "answers": "Porto",
                                        "context": [{"speaker": "Ana", "text": "I moved to Porto."},
                                                    {"speaker": "Bo", "text": "Nice!"}]}])
    assert DatasetEnv(dataset=rows, chunk_by="turns", chunk_size=1).task(0).chunks == ("Ana: I moved to Porto.",
                                                                                        "Bo: Nice!")
    text = datasets.Dataset.from_list([{"question": "Where?", "answers": "Porto",
                                        "context": "one two three four five six seven"}])
    assert DatasetEnv(dataset=text, chunk_by="words", chunk_size=3).task(0).chunks == (
        "one two three", "four five six", "seven")
    _, tok = tiny
    tok.save_pretrained(tmp_path / "tok")
    chunks = DatasetEnv(dataset=text, chunk_by="tokens", chunk_size=2, tokenizer=str(tmp_path / "tok")).task(0).chunks
    ids = tok("one two three four five six seven", add_special_tokens=False)["input_ids"]
    assert len(chunks) == (len(ids) + 1) // 2 and "".join(chunks).split() == "one two three four five six seven".split()


@pytest.mark.parametrize("kwargs, says", [
    ({"columns": {**COLUMNS, "question": "qq"}}, r"column 'qq' \(columns.question\) is not in the dataset \(did you "
                                                  r"mean 'q'\?\); its columns: qid, q, story, gold, kind, pairs"),
    ({"columns": {**COLUMNS, "answer": "gold"}}, r"columns: unknown role 'answer' \(did you mean 'answers'\?\)"),
    ({"chunk_by": "sentences"}, "chunk_by must be one of lines, turns, words, tokens"),
    ({"chunk_by": "tokens"}, "chunk_by tokens needs tokenizer"),
    ({"metric": "bleu"}, "metric must be one of f1, em, hotpotqa"),
    ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
])
def test_bad_settings_are_named(data_file, kwargs, says):
    with pytest.raises(InputError, match=says):
        _env(data_file, **kwargs)


@pytest.mark.parametrize("row, says", [
    ({"q": None}, r"row 0: column 'q' \(question\) must be a non-empty string"),
    ({"gold": [{"a": 1}]}, r"row 0: column 'gold' \(answers\) must be a string, a number or a non-empty list"),
    ({"story": ["a", "b"]}, r"row 0: column 'story' \(context\) must be a string with chunk_by lines"),
    ({"pairs": [{"instruction": "q"}]}, r"row 0: column 'pairs' \(reference_pairs\) must be a list"),
])
def test_a_mistyped_cell_is_named_with_its_row(tmp_path, row, says):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({**ROWS[0], **row}) + "\n")
    with pytest.raises(InputError, match=says):  # the environment checks its first task when made
        make_env("dataset", path="json", data_files=str(path), columns=COLUMNS)


def test_a_missing_or_malformed_file_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"datasets.load_dataset\(path='json', data_files=.*missing.jsonl"):
        make_env("dataset", path="json", data_files=str(tmp_path / "missing.jsonl"), columns=COLUMNS)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(InputError, match=r"broken.jsonl.* failed: "):
        make_env("dataset", path="json", data_files=str(broken), columns=COLUMNS)


def test_split_and_eval_records_back_as_a_dataset(data_file, tmp_path):
    from tmem_rl.analysis import load_records
    from tmem_rl.episode import EpisodeConfig
    from tmem_rl.evaluation.harness import EvalConfig, run_eval

    env = _env(data_file)
    train, heldout = split_env(env, "train", 0.5, 1), split_env(env, "heldout", 0.5, 1)
    assert sorted(t.task_id for t in train.tasks() + heldout.tasks()) == ["r0", "r1", "r2", "r3"]
    out = tmp_path / "eval"
    run_eval(EvalConfig(out=str(out), env="dataset", model="tiny", methods=["none", "tmem"], device="cpu",
                        env_kwargs={"path": "json", "data_files": str(data_file), "columns": COLUMNS,
                                    "chunk_size": 1},
                        episode=EpisodeConfig(l_max=8, max_answer_tokens=4, max_extraction_tokens=12)))
    records = load_records(out)
    assert isinstance(records, datasets.Dataset) and records.num_rows == 8
    assert sorted(set(records["method"])) == ["none", "tmem"] and set(records["category"]) == {
        "city", "pet", "food", "person"}
    tmem = records.filter(lambda r: r["method"] == "tmem")
    assert all(isinstance(json.loads(e), list) for e in tmem["extractions"])  # nested fields: JSON text
    assert any(json.loads(e) for e in tmem["extractions"])  # a budget of 8 tokens: every stream extracts


def test_a_recipe_on_a_dataset_trains_and_a_saved_batch_loads_as_a_dataset(tiny, data_file, tmp_path):
    import yaml

    from tmem_rl.analysis import load_records
    from tmem_rl.cli import main
    from tmem_rl.episode import EpisodeConfig, EpisodeRunner
    from tmem_rl.memory import FastWeightConfig, FastWeights

    recipe = {
        "algorithm": "grpo", "model": {"name": "tiny"},
        "env": {"name": "dataset", "kwargs": {"path": "json", "data_files": str(data_file), "columns": COLUMNS,
                                              "chunk_size": 1}},
        "inner_loop": {"epochs": 1},
        "episode": {"l_max": 8, "max_extraction_tokens": 12, "max_answer_tokens": 4},
        "outer_loop": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "num_generations": 2,
                       "questions_per_step": 1,
                       "save_steps": 1, "report_to": [], "max_completion_length": 12},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["step"] == 1 and (tmp_path / "run" / "checkpoint-1").exists()

    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(epochs=1))
    env = _env(data_file, chunk_size=1)
    batch = EpisodeRunner(model, tok, fast, EpisodeConfig(l_max=8, max_extraction_tokens=12, max_answer_tokens=4,
                                                          record_logprobs=True)).run(env, [env.task(0)] * 2)
    batch.save(tmp_path / "batch")
    rollouts = load_records(tmp_path / "batch")
    assert rollouts.num_rows == 2 and rollouts["task_id"] == ["r0", "r0"]
    assert len(json.loads(rollouts["segments"][0])) == len(batch.trajectories[0].segments)


def test_load_records_names_what_it_cannot_read(tmp_path):
    from tmem_rl.analysis import load_records

    with pytest.raises(InputError, match="expected an eval folder"):
        load_records(tmp_path)
    (tmp_path / "trajectories.json").write_text('{"rollouts": []}')
    with pytest.raises(InputError, match=r"trajectories.json: expected \{\"trajectories\": \[...\]\}"):
        load_records(tmp_path)
    (tmp_path / "trajectories.json").write_text("{cut short")
    with pytest.raises(InputError, match="trajectories.json: not valid JSON"):
        load_records(tmp_path)
