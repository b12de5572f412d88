import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tmem_rl.envs import make_env
from tmem_rl.episode import EpisodeConfig
from tmem_rl.envs.locomo import LocomoEnv
from tmem_rl.errors import InputError
from tmem_rl.evaluation import harness
from tmem_rl.evaluation.harness import EvalConfig, append_records, check_resumable, read_records, run_eval
from tmem_rl.evaluation.methods import METHODS, MethodSettings
from tmem_rl.memory import FastWeightConfig
from tmem_rl.models import tiny_model

FIXTURE = "tests/fixtures/locomo_tiny.json"
RECORD_KEYS = {"method", "sample_id", "question_id", "category", "question", "gold", "prediction", "f1", "em",
               "seconds"}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    model, tok = tiny_model(num_layers=4)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def config(tiny_path, out, l_max=120, **overrides):
    base = dict(data=FIXTURE, out=str(out), model=tiny_path,
                episode=EpisodeConfig(do_sample=False, l_max=l_max, max_answer_tokens=4, max_extraction_tokens=12,
                                      summary_tokens=8),
                fast_weights=FastWeightConfig(epochs=1), methods_settings=MethodSettings(answer_batch_size=4))
    base.update(overrides)
    return EvalConfig(**base)


def test_every_method_runs_end_to_end_in_question_mode(tiny_path, tmp_path):
    with pytest.raises(ValueError, match="tmem-reference needs reference pairs"):  # LoCoMo has no gold pairs
        run_eval(config(tiny_path, tmp_path, methods=list(METHODS), max_questions=5))
    methods = [m for m in METHODS if m != "tmem-reference"]
    summary = run_eval(config(tiny_path, tmp_path, methods=methods, max_questions=5))
    records = read_records(tmp_path / "results.jsonl")
    assert len(records) == 5 * len(methods)
    for r in records:
        assert RECORD_KEYS <= set(r)
        assert 0.0 <= r["f1"] <= 1.0 and r["em"] in (0.0, 1.0)
    tmem = [r for r in records if r["method"] == "tmem"]
    assert all(r["extractions"] for r in tmem), "the fixture's streams exceed L_max=120, so tmem must extract"
    assert set(summary) == set(methods)
    for s in summary.values():
        assert {"n", "skipped", "f1_by_category", "f1_1_4", "f1_1_5", "em", "seconds_per_episode"} <= set(s)
        assert s["n"] == 5 and s["skipped"] == len(LocomoEnv(FIXTURE).skipped) > 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["episode"]["l_max"] == 120 and saved["episode"]["do_sample"] is False
    assert saved["fast_weights"]["rank"] == 6
    assert (tmp_path / "f1_by_category.png").stat().st_size > 1000
    assert "| tmem+explicit |" in (tmp_path / "summary.md").read_text()


@pytest.fixture
def reads(monkeypatch):
    """The task ids of every `EpisodeRunner.read` call, one list per call."""
    calls = []
    original = harness.EpisodeRunner.read

    def counting_read(self, env, tasks):
        calls.append([t.task_id for t in tasks])
        return original(self, env, tasks)

    monkeypatch.setattr(harness.EpisodeRunner, "read", counting_read)
    return calls


def test_conversation_mode_reads_each_conversation_once(tiny_path, tmp_path, reads):
    run_eval(config(tiny_path, tmp_path, methods=["tmem", "none"], episode_unit="conversation"))
    records = read_records(tmp_path / "results.jsonl")
    samples = {r["sample_id"] for r in records}
    assert len(samples) == 2
    # Each conversation read once, no question in it; both in one lockstep batch (they fit in batch_size slots).
    assert len(reads) == 1 and sorted(reads[0]) == sorted(samples)
    per_method = {m: [r for r in records if r["method"] == m] for m in ("tmem", "none")}
    assert len(per_method["tmem"]) == len(per_method["none"]) > 2


def test_resume_finishes_each_question_exactly_once(tiny_path, tmp_path):
    cfg = config(tiny_path, tmp_path, methods=["none", "retrieval"])
    run_eval(cfg)
    full = read_records(tmp_path / "results.jsonl")
    lines = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    # Simulate a crash after k records, the last write torn in half.
    k = 3
    (tmp_path / "results.jsonl").write_text("".join(lines[:k]) + lines[k][: len(lines[k]) // 2])
    with pytest.raises(InputError, match="--resume"):
        run_eval(cfg)
    cfg.resume = True
    summary = run_eval(cfg)
    resumed = read_records(tmp_path / "results.jsonl")
    keys = [(r["method"], r["question_id"]) for r in resumed]
    assert len(keys) == len(set(keys)) == len(full)
    assert set(keys) == {(r["method"], r["question_id"]) for r in full}
    assert resumed[:k] == full[:k]  # what was written before the crash is kept as it was
    assert summary["none"]["n"] == len(full) // 2


def test_unknown_method_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="available: none, full-context"):
        EvalConfig(data=FIXTURE, out=str(tmp_path), methods=["rag"])


def test_eval_loads_the_model_on_the_chosen_device(tiny_path, tmp_path, monkeypatch):
    from tmem_rl.cli import main

    devices = []
    original = harness.load_policy

    def recording_load(name, *args, **kwargs):
        devices.append(str(kwargs.get("device")))
        return original(name, *args, **kwargs)

    monkeypatch.setattr(harness, "load_policy", recording_load)
    assert main(["eval", "--data", FIXTURE, "--model", tiny_path, "--method", "none", "--max-questions", "1",
                 "--greedy", "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    assert devices == ["cpu"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device"] == "cpu"
    assert EvalConfig(data=FIXTURE, out=str(tmp_path)).device == ("cuda" if harness.torch.cuda.is_available()
                                                                  else "cpu")


# ---- results file: resume keeps every valid record --------------------------------------------------------------


def record(method, question_id, f1=0.5):
    return {"method": method, "question_id": question_id, "f1": f1, "em": 0.0, "prediction": "Zoë"}


def test_junk_lines_in_the_middle_are_skipped_and_every_valid_record_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    valid = [json.dumps(record(*key)).encode() for key in (("none", "s/q0"), ("tmem", "s/q0"), ("none", "s/q1"))]
    # Lines 2, 3, 5 and 6: blank, not JSON, not UTF-8, JSON but not a record.
    lines = [valid[0], b"", b"{not json", valid[1], b"\xff\xfe not utf-8", b'{"method": "none"}', valid[2]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    before = path.read_bytes()
    with pytest.warns(UserWarning) as warned:
        records = read_records(path)
    assert [(r["method"], r["question_id"]) for r in records] == [("none", "s/q0"), ("tmem", "s/q0"), ("none", "s/q1")]
    messages = [str(w.message) for w in warned]
    assert len(messages) == 1  # one warning for the file, naming every junk line
    assert str(path) in messages[0] and "line(s) 2, 3, 5, 6" in messages[0]
    assert path.read_bytes() == before  # nothing is cut: the records after the junk stay in the file


def test_a_torn_last_line_is_dropped_and_cut_so_appends_start_clean(tmp_path):
    path = tmp_path / "results.jsonl"
    whole = json.dumps(record("none", "s/q0")) + "\n"
    torn = json.dumps(record("none", "s/q1"))[:25]
    path.write_text(whole + torn)
    assert [r["question_id"] for r in read_records(path)] == ["s/q0"]
    assert path.read_text() == whole
    append_records(path, [record("none", "s/q1")])
    assert [r["question_id"] for r in read_records(path)] == ["s/q0", "s/q1"]


def test_a_last_line_torn_inside_a_utf8_character_is_dropped(tmp_path):
    path = tmp_path / "results.jsonl"
    whole = (json.dumps(record("none", "s/q0"), ensure_ascii=False) + "\n").encode()
    torn = json.dumps(record("none", "s/q1"), ensure_ascii=False).encode()
    cut = torn.index("ë".encode()) + 1  # between the two bytes of "ë"
    path.write_bytes(whole + torn[:cut])
    assert [r["question_id"] for r in read_records(path)] == ["s/q0"]
    assert path.read_bytes() == whole


def test_a_complete_last_line_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(record("none", "s/q0")) + "\n" + json.dumps(record("none", "s/q1")))
    assert [r["question_id"] for r in read_records(path)] == ["s/q0", "s/q1"]
    append_records(path, [record("none", "s/q2")])
    assert [r["question_id"] for r in read_records(path)] == ["s/q0", "s/q1", "s/q2"]


def test_a_record_with_a_lone_surrogate_is_written_as_readable_json(tmp_path):
    path = tmp_path / "results.jsonl"
    append_records(path, [{**record("none", "s/q0"), "prediction": "half \ud800 a character"}])
    assert read_records(path)[0]["prediction"] == "half \ud800 a character"


# ---- resume: the same settings, or a clear error --------------------------------------------------------------


def saved_run(out, cfg):
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    append_records(out / "results.jsonl", [record("none", "syn-1/q0")])


def test_resume_with_other_settings_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    first = EvalConfig(data=FIXTURE, out=str(out), model="model-a", methods=["none"], episode={"l_max": 120})
    saved_run(out, first)
    saved = (out / "config.json").read_bytes(), (out / "results.jsonl").read_bytes()
    other = dataclasses.replace(first, model="model-b", episode=dataclasses.replace(first.episode, l_max=4096),
                                resume=True, fast_weights=FastWeightConfig(epochs=2))
    with pytest.raises(InputError) as err:
        run_eval(other)
    message = str(err.value)
    assert "\n" not in message and str(out / "config.json") in message
    assert "model: saved 'model-a', now 'model-b'" in message
    assert "episode.l_max: saved 120, now 4096" in message and "fast_weights.epochs: saved 5, now 2" in message
    assert "--out" in message
    # Only the settings that change results are named; resume itself (and out, device) may differ.
    assert set(re.findall(r"([\w.]+): saved", message)) == {"model", "episode.l_max", "fast_weights.epochs"}
    assert ((out / "config.json").read_bytes(), (out / "results.jsonl").read_bytes()) == saved


def test_a_run_saved_with_flat_episode_settings_resumes_and_refuses_a_change(tmp_path):
    out = tmp_path / "run"
    cfg = EvalConfig(data=FIXTURE, out=str(out), methods=["none"], episode={"l_max": 120, "max_pairs": 3})
    saved_run(out, cfg)
    # As a run before the episode settings were nested wrote config.json: flat, the others in episode_kwargs.
    saved = json.loads((out / "config.json").read_text())
    episode = saved.pop("episode")
    saved.update(l_max=120, greedy=False, temperature=0.4, top_p=0.9, top_k=10, max_extraction_tokens=192,
                 max_answer_tokens=50, seed=0, chat_template_kwargs=None, episode_kwargs={"max_pairs": 3})
    assert episode["temperature"] == 0.4 and episode["max_answer_tokens"] == 50  # the values it ran at
    (out / "config.json").write_text(json.dumps(saved))
    check_resumable(out, dataclasses.replace(cfg, resume=True))  # no error
    with pytest.raises(InputError, match=r"episode\.max_pairs: saved 3, now 8") as err:
        check_resumable(out, dataclasses.replace(cfg, episode=dataclasses.replace(cfg.episode, max_pairs=8)))
    assert set(re.findall(r"([\w.]+): saved", str(err.value))) == {"episode.max_pairs"}


def test_resume_may_add_methods_and_questions_and_move_device(tmp_path):
    out = tmp_path / "run"
    first = EvalConfig(data=FIXTURE, out=str(out), methods=["none"], max_questions=2, device="cpu",
                       env_kwargs={"seed": 1})
    saved_run(out, first)
    grown = dataclasses.replace(first, methods=["none", "tmem"], max_questions=None, per_category=3,
                                sample_ids=["syn-1"], device="cuda:1", resume=True,
                                methods_settings=MethodSettings(answer_batch_size=2))
    check_resumable(out, grown)  # no error
    with pytest.raises(InputError, match=r"env_kwargs\.seed: saved 1, now 2.*env_kwargs\.typo: saved \(not set\)"):
        check_resumable(out, dataclasses.replace(grown, env_kwargs={"seed": 2, "typo": 1}))
    with pytest.raises(InputError, match="methods_settings.retrieval_k"):
        check_resumable(out, dataclasses.replace(grown, methods_settings=MethodSettings(retrieval_k=3)))


def test_an_unreadable_saved_config_is_an_input_error(tmp_path):
    out = tmp_path / "run"
    cfg = EvalConfig(data=FIXTURE, out=str(out), methods=["none"], resume=True)
    saved_run(out, cfg)
    (out / "config.json").write_text('{"model": ')
    with pytest.raises(InputError, match="config.json: not valid JSON at line 1"):
        run_eval(cfg)


# ---- an interrupted run, resumed, has each (method, question) once --------------------------------------------

KILL_AFTER_WRITES = """
import os, signal, sys
from tmem_rl.evaluation import harness
from tmem_rl.cli import main

writes = []
original = harness.append_records

def append_then_die(path, records):
    # The second batch's first record is torn mid-line and the process killed, as a crash during a write leaves it.
    writes.append(len(records))
    if len(writes) == 2:
        line = harness._jsonl(records[0])
        with open(path, "a", encoding="utf-8") as f:
            f.write(line[: len(line) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    original(path, records)

harness.append_records = append_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_resumed_has_each_method_and_question_once(tiny_path, tmp_path):
    from tmem_rl.cli import main

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    args = ["eval", "--data", str(repo / FIXTURE), "--model", tiny_path, "--method", "none", "retrieval",
            "--max-questions", "5", "--batch-size", "2", "--l-max", "120", "--greedy", "--device", "cpu",
            "--out", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_WRITES, *args], cwd=repo, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    written = (out / "results.jsonl").read_bytes()
    assert not written.endswith(b"\n"), "the kill must leave a torn last line"
    assert written.count(b"\n") == 2  # the first batch (two questions) made it

    assert main([*args, "--resume"]) == 0
    records = read_records(out / "results.jsonl")
    keys = [(r["method"], r["question_id"]) for r in records]
    questions = [t.task_id for t in LocomoEnv(FIXTURE).tasks()[:5]]
    assert sorted(keys) == sorted((m, q) for m in ("none", "retrieval") for q in questions)  # each exactly once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["none"]["n"] == summary["retrieval"]["n"] == 5


def test_tasks_of_several_questions_are_read_once_and_recorded_per_question(tiny_path, tmp_path, reads):
    cfg = config(tiny_path, tmp_path, data=None, env="facts", l_max=40, methods=["none", "tmem"], max_questions=3,
                 env_kwargs={"num_tasks": 4, "num_facts": 3, "questions_per_task": 2})
    summary = run_eval(cfg)
    records = read_records(tmp_path / "results.jsonl")
    assert reads == [["facts-0-0", "facts-0-1", "facts-0-2"]]  # one lockstep batch: each stream read once
    for method in ("none", "tmem"):
        mine = [r for r in records if r["method"] == method]
        assert sorted(r["question_id"] for r in mine) == sorted(f"facts-0-{i}/q{j}" for i in range(3) for j in range(2))
        assert {r["sample_id"] for r in mine} == {"facts-0-0", "facts-0-1", "facts-0-2"}
        assert summary[method]["n"] == 6
    # The two answers of a reading ask different facts and are scored against their own golds.
    task = make_env("facts", num_tasks=4, num_facts=3, questions_per_task=2).task(0)
    first, second = (next(r for r in records if r["question_id"] == f"facts-0-0/q{j}") for j in range(2))
    assert (first["gold"], second["gold"]) == (task.questions[0].answers[0], task.questions[1].answers[0])
    cfg.resume = True
    run_eval(cfg)
    assert read_records(tmp_path / "results.jsonl") == records  # nothing left to do, nothing written twice
    # Interrupted after the first question of a task: the task is read again, its recorded question not rewritten.
    lines = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "results.jsonl").write_text(lines[0])
    run_eval(cfg)
    resumed = read_records(tmp_path / "results.jsonl")
    keys = [(r["method"], r["question_id"]) for r in resumed]
    assert len(keys) == len(set(keys)) and set(keys) == {(r["method"], r["question_id"]) for r in records}
    # In conversation mode each task is a conversation of its own: read once without its questions.
    reads.clear()
    conversation = dataclasses.replace(cfg, out=str(tmp_path / "conversation"), resume=False, methods=["tmem"],
                                       episode_unit="conversation")
    run_eval(conversation)
    assert reads == [["facts-0-0", "facts-0-1", "facts-0-2"]]
    assert len(read_records(tmp_path / "conversation" / "results.jsonl")) == 6


def test_the_summary_names_the_most_common_answer_and_its_share():
    records = [{"prediction": p, "f1": 0.0, "em": 0.0, "category": 1}
               for p in ("School event.", "school event", "the School Event", "Paris", "no")]
    summary = harness.summarize(records)
    assert (summary["top_answer"], summary["top_answer_share"]) == ("school event", 0.6)
    assert "| 0.600 |" in harness.markdown_table({"tmem": summary})
    assert harness.summarize([])["top_answer_share"] is None
