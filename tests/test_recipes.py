import json
from pathlib import Path

import pytest

from tmem_rl.recipes import RecipeError, load_recipe

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.algorithm in ("grpo", "ppo")
    assert path.read_text().startswith("# "), "a recipe opens with the command that launches it"
    assert "tmem-rl train" in path.read_text().splitlines()[0] or "tmem_rl.cli train" in path.read_text()


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"quickstart_cpu.yaml", "locomo_grpo_qwen3_4b.yaml"}


def test_paper_recipe_carries_the_paper_settings():
    recipe = load_recipe(next(p for p in RECIPES if p.name == "locomo_grpo_qwen3_4b.yaml"))
    assert (recipe.outer_loop.max_steps, recipe.outer_loop.questions_per_step, recipe.outer_loop.num_generations,
            recipe.outer_loop.max_completion_length, recipe.episode.l_max) == (200, 64, 8, 1024, 4096)
    assert (recipe.inner_loop.rank, recipe.inner_loop.lr, recipe.inner_loop.epochs, recipe.inner_loop.init) == (
        6, 5e-4, 5, "svd")


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_the_key_and_file(tmp_path):
    path = write(tmp_path, "outer_loop:\n  learning_rat: 1e-5\n")
    with pytest.raises(RecipeError, match=rf"{path}: unknown key 'outer_loop.learning_rat'"):
        load_recipe(path)


def test_wrong_type_names_the_key_and_file(tmp_path):
    path = write(tmp_path, "inner_loop:\n  epochs: five\n")
    with pytest.raises(RecipeError, match=rf"{path}: 'inner_loop.epochs' must be int, got 'five'"):
        load_recipe(path)
    path = write(tmp_path, "outer_loop:\n  use_peft: 1\n")
    with pytest.raises(RecipeError, match="'outer_loop.use_peft' must be bool"):
        load_recipe(path)


def test_overrides_are_typed_too(tmp_path):
    path = write(tmp_path, "outer_loop:\n  max_steps: 10\n")
    recipe = load_recipe(path, ["outer_loop.max_steps=3", "env.kwargs.num_facts=2", "inner_loop.lr=1e-3"])
    assert recipe.outer_loop.max_steps == 3 and recipe.env.kwargs == {"num_facts": 2}
    assert recipe.inner_loop.lr == 1e-3
    with pytest.raises(RecipeError, match="'outer_loop.max_steps' must be int"):
        load_recipe(path, ["outer_loop.max_steps=many"])
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(path, ["outer_loop.max_steps"])


def test_value_errors_from_the_section_name_it(tmp_path):
    path = write(tmp_path, "outer_loop:\n  loss_type: sum\n")
    with pytest.raises(RecipeError, match=rf"{path}: section 'outer_loop'.*loss_type"):
        load_recipe(path)


def test_ppo_recipes_get_ppo_settings(tmp_path):
    path = write(tmp_path, "algorithm: ppo\nouter_loop:\n  vf_coef: 0.5\n  num_generations: 1\n")
    recipe = load_recipe(path)
    assert type(recipe.outer_loop).__name__ == "PPOConfig" and recipe.outer_loop.vf_coef == 0.5
    with pytest.raises(RecipeError, match="unknown key 'outer_loop.vf_coef'"):
        load_recipe(write(tmp_path, "outer_loop:\n  vf_coef: 0.5\n"))
    with pytest.raises(RecipeError, match="'algorithm' must be one of"):
        load_recipe(write(tmp_path, "algorithm: dpo\n"))


def test_train_entry_point_runs_checkpoints_and_resumes(tmp_path):
    from tmem_rl.cli import main
    from tmem_rl.models import tiny_model

    model, tok = tiny_model(num_layers=2)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "run"
    overrides = [f"model.name={tmp_path / 'tiny'}", f"outer_loop.output_dir={out}", "outer_loop.max_steps=2",
                 "outer_loop.save_steps=1", "inner_loop.num_layers=2",
                 "inner_loop.epochs=1", "episode.max_extraction_tokens=8", "episode.max_answer_tokens=4",
                 "env.kwargs.num_distractors=4", "outer_loop.num_generations=2", "outer_loop.questions_per_step=1"]
    recipe = str(next(p for p in RECIPES if p.name == "quickstart_cpu.yaml"))
    assert main(["train", recipe, *overrides]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and (out / "checkpoint-2" / "trainer_state.json").exists()
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert list(out.rglob("events.out.tfevents*")), "the recipe reports to TensorBoard"
    longer = [o if not o.startswith("outer_loop.max_steps") else "outer_loop.max_steps=3" for o in overrides]
    assert main(["train", recipe, *longer, "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_learning_recipe_trains_only_on_its_train_split_and_eval_takes_the_held_out_side(tmp_path, monkeypatch):
    from tmem_rl.cli import main
    from tmem_rl.envs.split import TaskSplit
    from tmem_rl.evaluation.harness import read_records
    from tmem_rl.models import tiny_model
    from tmem_rl.rollout import EpisodeRunner

    model, tok = tiny_model(num_layers=4)  # the recipe adapts the last 4 layers
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    sampled = []
    original = EpisodeRunner.run

    def recording_run(self, env, tasks):
        sampled.extend(t.task_id for t in tasks)
        return original(self, env, tasks)

    monkeypatch.setattr(EpisodeRunner, "run", recording_run)
    out = tmp_path / "run"
    overrides = [f"model.name={tmp_path / 'tiny'}", f"outer_loop.output_dir={out}", "outer_loop.max_steps=2",
                 "outer_loop.save_steps=2", "inner_loop.epochs=1",
                 "episode.max_extraction_tokens=8", "episode.max_answer_tokens=4", "env.kwargs.num_tasks=12",
                 "outer_loop.num_generations=2", "outer_loop.questions_per_step=3"]
    recipe_path = str(next(p for p in RECIPES if p.name == "facts_grpo_cpu.yaml"))
    assert main(["train", recipe_path, *overrides]) == 0
    recipe = load_recipe(recipe_path, overrides)
    heldout = {t.task_id for t in recipe.env.make("heldout").tasks()}
    assert isinstance(recipe.env.make("train"), TaskSplit) and heldout
    assert len(sampled) == 2 * 3 * 2 and not set(sampled) & heldout

    evaluated = tmp_path / "eval"
    assert main(["eval", "--recipe", recipe_path, "--model", str(tmp_path / "tiny"), "--method", "tmem",
                 "--checkpoint", str(out / "checkpoint-2"), "--max-questions", "2", "--greedy", "--inner-epochs",
                 "1", "--env-kwargs", '{"num_tasks": 12}', "--out", str(evaluated), "--device", "cpu"]) == 0
    records = read_records(evaluated / "results.jsonl")
    assert {r["method"] for r in records} == {"tmem", "tmem@trained"}
    assert {r["question_id"] for r in records} <= heldout
    config = json.loads((evaluated / "config.json").read_text())
    assert (config["split"], config["heldout_fraction"], config["l_max"], config["episode_kwargs"]["max_pairs"]) == (
        "heldout", 0.25, 56, 3)
    # The recipe's checkpoint on another environment: that environment's own tasks, the recipe's agent settings.
    other = tmp_path / "eval_locomo"
    assert main(["eval", "--recipe", recipe_path, "--env", "locomo", "--data", "tests/fixtures/locomo_tiny.json",
                 "--model", str(tmp_path / "tiny"), "--method", "tmem", "--checkpoint", str(out / "checkpoint-2"),
                 "--max-questions", "2", "--greedy", "--inner-epochs", "1", "--max-pairs", "2", "--out", str(other),
                 "--device", "cpu"]) == 0
    config = json.loads((other / "config.json").read_text())
    assert (config["env"], config["env_kwargs"], config["split"], config["episode_kwargs"]["max_pairs"],
            config["episode_kwargs"]["examples"], config["fast_weights"]["lr"]) == ("locomo", {}, "all", 2, False, 1e-3)
    assert {r["method"] for r in read_records(other / "results.jsonl")} == {"tmem", "tmem@trained"}
