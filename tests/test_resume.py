"""`tmem-rl train --resume` continues the run its output folder holds, with the recipe it was trained with: the run
records that recipe, a resume with other settings is refused naming the keys, and one with nothing to resume says
so. (Resumed runs equal to uninterrupted ones, at 1 and 2 processes: tests/test_faults.py.)"""

import dataclasses
import json

import pytest
import yaml

from tmem_rl.cli import main
from tmem_rl.recipes import load_recipe
from tmem_rl.trainers.checkpoints import write_manifest
from test_cli_errors import TINY_RECIPE, one_error_line

# The command-line tests' tiny run, with LoRA slow weights: a changed lora_r must be refused by name.
RECIPE = TINY_RECIPE.replace("inner_loop: {lr: 0.05, epochs: 1}", "inner_loop: {lr: 0.05, epochs: 1, num_layers: 2}") + """\
  use_peft: true
  lora_r: 4
  lora_target_modules: [q_proj]
"""
error_line = one_error_line


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("OUT", str(tmp_path / "run")))
    return path


def test_a_resume_with_another_recipe_is_refused_naming_the_keys(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(recipe)]) == 0
    # The run's recipe, as run: its hash is the checkpoints' and its text trains the same run again.
    recorded = (out / "recipe.yaml").read_text()
    run = json.loads((out / "checkpoint-1" / "run.json").read_text())
    assert recorded.splitlines()[0].endswith(f"sha256: {run['recipe_sha256']}")
    assert yaml.safe_load(recorded) == run["recipe"]
    assert dataclasses.asdict(load_recipe(out / "recipe.yaml")) == dataclasses.asdict(load_recipe(recipe))
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    # Its shapes would not load: caught as a recipe change, before any weights are read.
    assert main(["train", str(recipe), "--resume", "outer_loop.lora_r=8"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line == (f"tmem-rl: error: checkpoint {out / 'checkpoint-1'} was trained with another recipe: "
                    "outer_loop.lora_r (4 -> 8); pass --allow-recipe-change outer_loop.lora_r to resume with these "
                    "changes, or --overwrite to start over")

    changed = ["env.kwargs.num_facts=2", "inner_loop.rank=4", "outer_loop.max_steps=2", "outer_loop.save_steps=5"]
    assert main(["train", str(recipe), "--resume", *changed, "--allow-recipe-change", "outer_loop.max_steps"]) == 2
    line = error_line(capsys.readouterr().err)
    assert ": env.kwargs.num_facts (3 -> 2), inner_loop.rank (6 -> 4); pass --allow-recipe-change " \
           "env.kwargs.num_facts,inner_loop.rank to resume" in line
    assert (out / "metrics.jsonl").read_text() == metrics

    # Named, a change goes through; a bookkeeping key (save_steps) needs no naming.
    assert main(["train", str(recipe), "--resume", "--allow-recipe-change", "outer_loop.max_steps",
                 "outer_loop.max_steps=2", "outer_loop.save_steps=2"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert load_recipe(out / "recipe.yaml").outer_loop.max_steps == 2

    # A misspelt allowed key is named with the closest one, not left to repeat the refusal.
    assert main(["train", str(recipe), "--resume", "--allow-recipe-change", "outer_loop.max_step",
                 "outer_loop.max_steps=3"]) == 2
    assert error_line(capsys.readouterr().err).endswith(
        "--allow-recipe-change outer_loop.max_step: no such recipe key (did you mean 'outer_loop.max_steps'?)")

    # A checkpoint written before a setting existed resumes with its default and a warning (the flag may come
    # before the recipe path).
    checkpoint = out / "checkpoint-2"
    run = json.loads((checkpoint / "run.json").read_text())
    del run["recipe"]["episode"]["stop_extractions"]
    (checkpoint / "run.json").write_text(json.dumps(run))
    write_manifest(checkpoint, 2)
    with pytest.warns(UserWarning, match="predates the settings episode.stop_extractions: resuming with their defaults"):
        assert main(["train", "--resume", "--allow-recipe-change", "outer_loop.max_steps", str(recipe),
                     "outer_loop.max_steps=3"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_with_no_earlier_run_says_it_starts_fresh(recipe, tmp_path, capsys):
    assert main(["train", str(recipe), "--allow-recipe-change", "outer_loop.max_steps"]) == 2
    assert "--allow-recipe-change applies only with --resume" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    with pytest.warns(UserWarning, match=r"--resume: .*run holds no checkpoint to resume from; starting a fresh run"):
        assert main(["train", str(recipe), "--resume"]) == 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
