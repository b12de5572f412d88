import json

import pytest

from tmem_rl.envs.locomo import LocomoEnv
from tmem_rl.evaluation import harness
from tmem_rl.evaluation.harness import EvalConfig, read_records, run_eval
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


def config(tiny_path, out, **overrides):
    base = dict(data=FIXTURE, out=str(out), model=tiny_path, greedy=True, l_max=120, max_answer_tokens=4,
                max_extraction_tokens=12,
                fast_weights=FastWeightConfig(epochs=1), methods_settings=MethodSettings(summary_tokens=8,
                                                                                         answer_batch_size=4))
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
    assert saved["l_max"] == 120 and saved["fast_weights"]["rank"] == 6 and saved["greedy"] is True
    assert (tmp_path / "f1_by_category.png").stat().st_size > 1000
    assert "| tmem+explicit |" in (tmp_path / "summary.md").read_text()


def test_conversation_mode_reads_each_conversation_once(tiny_path, tmp_path, monkeypatch):
    reads = []
    original = harness.EpisodeRunner.read

    def counting_read(self, env, tasks):
        reads.append([t.task_id for t in tasks])
        return original(self, env, tasks)

    monkeypatch.setattr(harness.EpisodeRunner, "read", counting_read)
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
    with pytest.raises(FileExistsError, match="--resume"):
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
