"""Bad input at the command line: one line naming the file / key / value and what was expected, exit status 2,
no traceback."""

import pytest

from tmem_rl.cli import main

TINY_RECIPE = """\
model:
  name: tiny
env:
  name: facts
  kwargs: {num_tasks: 4, num_distractors: 6, num_facts: 3, lines_per_chunk: 3}
inner_loop: {lr: 0.05, epochs: 1}
episode: {l_max: 60, max_extraction_tokens: 8, max_answer_tokens: 6}
outer_loop:
  output_dir: OUT
  max_steps: 1
  save_steps: 1
  questions_per_step: 1
  num_generations: 2
  max_completion_length: 8
  report_to: []
"""


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("tmem-rl: error:")]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(TINY_RECIPE.replace("OUT", str(tmp_path / "run")))
    return path


@pytest.mark.parametrize("overrides, expected", [
    (["outer_loop.max_steps=-3"], "max_steps=-3: expected a positive number"),
    (["model.dtype=float33"], "dtype 'float33' is not one of float32, bfloat16, float16"),
    (["env.kwargs.num_fact=3"], "environment 'facts': unknown setting(s) 'num_fact'; accepted: "),
    (["outer_loop.max_steps=[1,"], "override 'outer_loop.max_steps=[1,': the value is not valid YAML"),
    (["outer_loop.learning_rate=fast"], "'outer_loop.learning_rate' must be float, got 'fast'"),
    (["model.name=/no/such/folder"], "model /no/such/folder: no such folder"),
    (["nonsense"], "override 'nonsense': expected key=value"),
])
def test_bad_recipe_values_are_one_line_errors(recipe, capsys, overrides, expected):
    assert main(["train", str(recipe), *overrides]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert expected in line


def test_empty_and_unreadable_recipes(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert main(["train", str(empty)]) == 2
    assert f"{empty}: the recipe is empty" in one_error_line(capsys.readouterr().err)

    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model:\n  name: caf\xe9\n".encode("latin-1"))
    assert main(["train", str(latin)]) == 2
    assert f"{latin}: not UTF-8 text (byte 18" in one_error_line(capsys.readouterr().err)

    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such recipe file" in one_error_line(capsys.readouterr().err)


def test_convert_of_a_missing_path_fails(capsys):
    assert main(["convert", "/nonexistent"]) == 2
    assert "/nonexistent: no such folder" in one_error_line(capsys.readouterr().err)
    assert capsys.readouterr().out == ""


def test_export_of_a_missing_checkpoint_fails(tmp_path, capsys):
    assert main(["export", str(tmp_path / "checkpoint-9"), "--out", str(tmp_path / "out")]) == 2
    assert "checkpoint-9: no such folder" in one_error_line(capsys.readouterr().err)


def test_train_refuses_an_existing_run_and_continues_with_resume(recipe, tmp_path, capsys):
    assert main(["train", str(recipe)]) == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds a run (checkpoint-1, metrics.jsonl)" in line and "--resume" in line and "--overwrite" in line
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert main(["train", str(recipe), "--resume", "outer_loop.max_steps=2",
                 "--allow-recipe-change", "outer_loop.max_steps"]) == 0
    assert [l for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][0] == metrics.strip()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["train", str(recipe), "--overwrite"]) == 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--batch-size", "--retrieval-k", "--context-budget"])
def test_eval_method_settings_below_one_fail_before_any_model_loads(tmp_path, capsys, flag):
    assert main(["eval", "--env", "facts", "--env-kwargs", '{"num_tasks": 3}', "--out", str(tmp_path / "run"),
                 flag, "0"]) == 2
    assert "expected a positive number" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--method", "none", "tmme"], "unknown method(s) 'tmme' (did you mean 'tmem'?); available: none, "),
    (["--env", "factz"], "unknown environment 'factz' (did you mean 'facts'?); available: "),
])
def test_eval_suggests_the_closest_name_for_a_misspelt_method_or_environment(tmp_path, capsys, flags, expected):
    assert main(["eval", "--out", str(tmp_path / "run"), *flags]) == 2
    assert expected in one_error_line(capsys.readouterr().err)


def test_convert_of_the_built_in_tiny_model_says_it_has_no_folder(capsys):
    assert main(["convert", "tiny"]) == 2
    assert "'tiny' is built in memory" in one_error_line(capsys.readouterr().err)
