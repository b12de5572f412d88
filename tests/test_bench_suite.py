"""benchmarks/run_all.py on stand-in scripts: one that reports JSON, one that crashes, one that prints no JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"

REPORTS = """import json, sys
print("warming up")
print(json.dumps({"speed": 1.5, "quick": "--quick" in sys.argv, "nested": {"x": 2}}))
"""
CRASHES = """import sys
print("not json")
sys.exit("broken on purpose")
"""
SILENT = """print("done, but no result")
"""


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", RUN_ALL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_suite_records_success_and_failure(run_all, tmp_path):
    scripts_dir = tmp_path / "benchmarks"
    scripts_dir.mkdir()
    (scripts_dir / "reports.py").write_text(REPORTS)
    (scripts_dir / "crashes.py").write_text(CRASHES)
    (scripts_dir / "silent.py").write_text(SILENT)
    (scripts_dir / "_helper.py").write_text("raise SystemExit('a helper is not a benchmark')\n")
    (scripts_dir / "ship_extractor.py").write_text("raise SystemExit('a step of a study is not a benchmark')\n")
    scripts = run_all.discover(scripts_dir)
    assert sorted(scripts) == ["crashes", "reports", "silent"]

    out = tmp_path / "out"
    run_all.run_suite(scripts, out, quick=True, timeout=60)

    results = json.loads((out / "results.json").read_text())
    reports, crashes, silent = (results["benchmarks"][name] for name in ("reports", "crashes", "silent"))
    assert reports["status"] == "ok" and reports["exit_status"] == 0
    assert reports["result"] == {"speed": 1.5, "quick": True, "nested": {"x": 2}}
    assert reports["command"].endswith("reports.py --quick") and reports["seconds"] >= 0
    assert crashes["status"] == "failed (exit 1)" and crashes["exit_status"] == 1
    assert crashes["stderr_tail"][-1] == "broken on purpose" and "result" not in crashes
    assert silent["exit_status"] == 0 and silent["status"].startswith("failed (last stdout line is not")
    machine = results["machine"]
    for key in ("cpu", "logical_cores", "torch_threads", "gpus", "torch", "transformers", "python", "date"):
        assert machine.get(key) is not None, key
    assert machine["omp_wait_policy"]  # quick runs wait passively unless the caller chose a policy

    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 5  # header, separator, one row per script: a single table
    assert rows[2].startswith("| crashes | failed (exit 1) |") and "broken on purpose" in rows[2]
    assert rows[3].startswith("| reports | ok |") and "speed 1.5" in rows[3]
    assert rows[4].startswith("| silent | failed (last stdout line is not a JSON object) |")
    assert table.index(machine["cpu"]) < table.index("| benchmark |")


def test_last_line_must_be_a_json_object(run_all):
    assert run_all.last_line_json('noise\n{"a": 1}\n') == {"a": 1}
    assert run_all.last_line_json('{"a": 1}\nnoise') is None
    assert run_all.last_line_json("[1, 2]") is None
    assert run_all.last_line_json("") is None


def test_headlines_reach_into_nested_results(run_all):
    result = {"episodes": [{"s": 1.0}, {"s": 2.0}], "decode_step": {"ms": 3.0}}
    assert run_all.lookup(result, "episodes.-1.s") == 2.0
    assert run_all.lookup(result, "decode_step.ms") == 3.0
    assert run_all.lookup(result, "decode_step.missing") is None
    assert run_all.lookup(result, "episodes.9.s") is None


def test_unknown_benchmark_is_one_line_error(run_all, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_all.main(["--only", "no_such_benchmark"])
    assert exit_info.value.code == 2
    assert "unknown benchmark no_such_benchmark" in capsys.readouterr().err


@pytest.fixture(scope="module")
def learning_curve():
    import sys

    benchmarks = str(RUN_ALL.parent)
    sys.path.insert(0, benchmarks)  # the script imports its sibling _quick, as it does when run from there
    try:
        spec = importlib.util.spec_from_file_location("learning_curve", RUN_ALL.parent / "learning_curve.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(benchmarks)
    return module


def test_learning_curve_scores_episodes_and_bootstraps_their_differences(learning_curve):
    records = [{"method": "tmem", "sample_id": "e1", "f1": 1.0}, {"method": "tmem", "sample_id": "e1", "f1": 0.0},
               {"method": "tmem", "sample_id": "e2", "f1": 0.25}, {"method": "none", "sample_id": "e1", "f1": 1.0}]
    assert learning_curve.f1_by_episode(records, "tmem") == {"e1": 0.5, "e2": 0.25}
    before = {"e1": 0.0, "e2": 0.5, "e3": 0.5}
    mean, (low, high) = learning_curve.paired_bootstrap(before, {"e1": 1.0, "e2": 0.5, "e3": 0.5, "e4": 1.0})
    assert mean == pytest.approx(1 / 3)  # over the shared episodes only
    assert low == 0.0 and high == 1.0  # resamples of {1, 0, 0}: from all zeros to all ones
    assert learning_curve.paired_bootstrap(before, before) == (0.0, [0.0, 0.0])


def test_a_training_lever_changes_the_trained_recipe_and_no_evaluation(learning_curve):
    recipe, trained = learning_curve.load_recipes(str(RUN_ALL.parents[1] / "recipes/facts_multi_grpo_cpu.yaml"),
                                                  ["outer_loop.learning_rate=1e-4"], ["inner_loop.epochs=10"], 3)
    assert (recipe.inner_loop.epochs, trained.inner_loop.epochs) == (20, 10)
    assert recipe.outer_loop.learning_rate == trained.outer_loop.learning_rate == 1e-4
    assert recipe.outer_loop.max_steps == trained.outer_loop.max_steps == recipe.outer_loop.save_steps == 3
