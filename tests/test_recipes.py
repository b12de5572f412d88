import dataclasses
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
    with pytest.raises(RecipeError, match=rf"{path}: unknown key 'outer_loop.learning_rat' \(did you mean "
                                          r"'outer_loop.learning_rate'\?\); known keys: "):
        load_recipe(path)
    path = write(tmp_path, "modle: {name: tiny}\n")
    with pytest.raises(RecipeError, match=r"unknown key 'modle' \(did you mean 'model'\?\); known keys: "
                                          "algorithm, model, "):
        load_recipe(path)
    path = write(tmp_path, "inner_loop: {zzz: 1}\n")  # nothing close: no guess
    with pytest.raises(RecipeError, match=r"unknown key 'inner_loop.zzz'; known keys: "):
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


def test_train_entry_point_runs_checkpoints_and_resumes(tmp_path, monkeypatch):
    """...with a curriculum: step 1 reads streams of 1 distractor line, the rest (the resumed step too) 4."""
    from tmem_rl.cli import main
    from tmem_rl.models import tiny_model
    from tmem_rl.episode import EpisodeRunner

    lines_read = []
    original = EpisodeRunner.run

    def recording_run(self, env, tasks):
        lines_read.append({sum(len(c.splitlines()) for c in t.chunks) for t in tasks})
        return original(self, env, tasks)

    monkeypatch.setattr(EpisodeRunner, "run", recording_run)
    model, tok = tiny_model(num_layers=2)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "run"
    overrides = [f"model.name={tmp_path / 'tiny'}", f"outer_loop.output_dir={out}", "outer_loop.max_steps=2",
                 "outer_loop.save_steps=1", "inner_loop.num_layers=2",
                 "inner_loop.epochs=1", "episode.max_extraction_tokens=8", "episode.max_answer_tokens=4",
                 "env.kwargs.num_distractors=4", "outer_loop.num_generations=2", "outer_loop.questions_per_step=1",
                 "env.curriculum=[{until_step: 1, kwargs: {num_distractors: 1}}]"]
    recipe = str(next(p for p in RECIPES if p.name == "quickstart_cpu.yaml"))
    assert main(["train", recipe, *overrides]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and (out / "checkpoint-2" / "trainer_state.json").exists()
    facts = load_recipe(recipe, overrides).env.kwargs.get("num_facts", 3)
    assert lines_read == [{facts + 1}, {facts + 4}]
    assert [json.loads(line)["curriculum_stage"] for line in lines] == [0, 1]
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert list(out.rglob("events.out.tfevents*")), "the recipe reports to TensorBoard"
    longer = [o if not o.startswith("outer_loop.max_steps") else "outer_loop.max_steps=3" for o in overrides]
    assert main(["train", recipe, *longer, "--resume", "--allow-recipe-change", "outer_loop.max_steps"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and lines_read[-1] == {facts + 4}


@pytest.mark.parametrize("stages, expected", [
    ("[{until_step: 2, kwargs: {}}, {until_step: 2, kwargs: {}}]", r"curriculum\[1\]\.until_step: expected an integer above 2"),
    ("[{until_step: 2}]", r"curriculum\[0\]: expected \{until_step: N, kwargs"),
    ("[{until_step: 2, kwargs: 3}]", r"curriculum\[0\]\.kwargs: expected a mapping"),
])
def test_a_curriculum_out_of_order_or_malformed_names_the_stage(tmp_path, stages, expected):
    with pytest.raises(RecipeError, match=rf"section 'env': {expected}"):
        load_recipe(write(tmp_path, "env:\n  name: facts\n"), [f"env.curriculum={stages}"])


def test_learning_recipe_trains_only_on_its_train_split_and_eval_takes_the_held_out_side(tmp_path, monkeypatch):
    from tmem_rl.cli import main
    from tmem_rl.envs.split import TaskSplit
    from tmem_rl.evaluation.harness import read_records
    from tmem_rl.models import tiny_model
    from tmem_rl.episode import EpisodeRunner

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
    assert (config["split"], config["heldout_fraction"], config["episode"]["l_max"], config["episode"]["max_pairs"],
            config["episode"]["do_sample"]) == ("heldout", 0.25, 56, 3, False)
    # The whole episode section reaches the evaluation, the sampling as training samples (unless --greedy).
    as_written = load_recipe(recipe_path)  # without the training run's overrides
    assert config["episode"] == {**dataclasses.asdict(as_written.episode), "do_sample": False,
                                 "temperature": as_written.outer_loop.temperature,
                                 "top_p": as_written.outer_loop.top_p, "top_k": as_written.outer_loop.top_k}
    # The recipe's checkpoint on another environment: that environment's own tasks, the recipe's agent settings.
    other = tmp_path / "eval_locomo"
    assert main(["eval", "--recipe", recipe_path, "--env", "locomo", "--data", "tests/fixtures/locomo_tiny.json",
                 "--model", str(tmp_path / "tiny"), "--method", "tmem", "--checkpoint", str(out / "checkpoint-2"),
                 "--max-questions", "2", "--greedy", "--inner-epochs", "1", "--max-pairs", "2", "--out", str(other),
                 "--device", "cpu"]) == 0
    config = json.loads((other / "config.json").read_text())
    assert (config["env"], config["env_kwargs"], config["split"], config["episode"]["max_pairs"],
            config["episode"]["examples"], config["fast_weights"]["lr"]) == ("locomo", {}, "all", 2, False, 1e-3)
    assert {r["method"] for r in read_records(other / "results.jsonl")} == {"tmem", "tmem@trained"}


# ---- reward functions by dotted path -----------------------------------------------------------------------------

# The recipes below name these as "test_recipes:...": pytest puts tests/ on sys.path and imports this file under
# that name, so the path resolves to this very module.
SHOUTING = "not a function"


def shortness(prompts, completions, **kwargs):
    """A reward function for the recipe tests: 1.0 for an empty answer, less the longer it is."""
    return [1.0 / (1 + len(c)) for c in completions]


@pytest.mark.parametrize("value, expected", [
    ('"test_recipes"', r"'reward_funcs.short' must be \"package.module:function\", got 'test_recipes'"),
    ('"test_recipes:"', r"'reward_funcs.short' must be \"package.module:function\""),
    ('"tests/test_recipes.py:shortness"', r"'reward_funcs.short' must be \"package.module:function\""),
    ("3", r"'reward_funcs.short' must be \"package.module:function\", got 3"),
])
def test_a_reward_function_path_of_the_wrong_form_names_the_key(tmp_path, value, expected):
    """The form is checked on loading; the module is only imported by run_recipe."""
    path = write(tmp_path, f"reward_funcs:\n  short: {value}\n")
    with pytest.raises(RecipeError, match=rf"{path}: {expected}"):
        load_recipe(path)


def test_a_well_formed_path_is_kept_as_written_until_the_run(tmp_path):
    path = write(tmp_path, "reward_funcs:\n  short: no_such_module_of_rewards:shortness\n"
                           "outer_loop:\n  reward_weights: {outcome: 1.0, short: 0.1, long: 0.1}\n")
    recipe = load_recipe(path, ["reward_funcs.long=pkg.rewards:Scorer.length"])
    assert recipe.reward_funcs == {"short": "no_such_module_of_rewards:shortness", "long": "pkg.rewards:Scorer.length"}


def test_a_reward_function_without_a_weight_is_refused(tmp_path):
    path = write(tmp_path, "reward_funcs:\n  short: test_recipes:shortness\n"
                           "outer_loop:\n  reward_weights: {outcome: 1.0, shortness: 0.1}\n")
    with pytest.raises(RecipeError, match=r"'reward_funcs.short' has no weight in 'outer_loop.reward_weights' "
                                          r"\(weighed: outcome, shortness\)"):
        load_recipe(path)


def test_outcome_is_not_a_reward_function_name(tmp_path):
    path = write(tmp_path, "reward_funcs:\n  outcome: test_recipes:shortness\n")
    with pytest.raises(RecipeError, match="'reward_funcs.outcome': outcome is the environment's own score"):
        load_recipe(path)


@pytest.mark.parametrize("target, expected", [
    ("no_such_module_of_rewards:shortness", "cannot import module 'no_such_module_of_rewards' "
                                            "(ModuleNotFoundError: "),
    ("test_recipes:longness", "module 'test_recipes' has no attribute 'longness'"),
    ("test_recipes:shortness.missing", "module 'test_recipes' has no attribute 'shortness.missing'"),
    ("test_recipes:SHOUTING", "'SHOUTING' is not callable (it is a str)"),
])
def test_a_reward_function_that_cannot_be_resolved_is_one_error_naming_key_and_path(target, expected):
    from tmem_rl.recipes import resolve_reward_funcs

    with pytest.raises(RecipeError) as raised:
        resolve_reward_funcs({"short": target})
    assert str(raised.value).startswith(f"reward_funcs.short: {target!r}: ") and expected in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_reward_function_that_fails_to_resolve_stops_train_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from tmem_rl import models
    from tmem_rl.cli import main

    monkeypatch.setattr(models, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    path = write(tmp_path, "model: {name: tiny}\nreward_funcs:\n  short: test_recipes:longness\n"
                           "outer_loop:\n  reward_weights: {outcome: 1.0, short: 0.1}\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("tmem-rl: error: reward_funcs.short: 'test_recipes:longness': module "
                           "'test_recipes' has no attribute 'longness'")


def test_reward_functions_by_path_reach_the_trainer_and_are_weighed(tmp_path, monkeypatch):
    from tmem_rl.recipes import run_recipe
    from tmem_rl.trainers.grpo import GRPOTrainer

    seen = {}
    original = GRPOTrainer.rewards

    def recording_rewards(self, trajectories):
        seen["funcs"] = dict(self.reward_funcs)
        total, parts = original(self, trajectories)
        seen["parts"], seen["completions"] = parts, [t.prediction for t in trajectories]
        return total, parts

    monkeypatch.setattr(GRPOTrainer, "rewards", recording_rewards)
    path = write(tmp_path, f"""\
model: {{name: tiny}}
env: {{name: facts, kwargs: {{num_tasks: 2, num_distractors: 2, num_facts: 2}}}}
reward_funcs: {{short: "test_recipes:shortness"}}
inner_loop: {{lr: 0.05, epochs: 1}}
episode: {{l_max: 4096, max_extraction_tokens: 8, max_answer_tokens: 4}}
outer_loop:
  output_dir: {tmp_path / "run"}
  max_steps: 1
  save_steps: 0
  questions_per_step: 1
  num_generations: 2
  max_completion_length: 8
  report_to: []
  reward_weights: {{outcome: 1.0, short: 0.5}}
""")
    history = run_recipe(load_recipe(path))
    assert seen["funcs"]["short"] is shortness
    expected = sum(shortness([], seen["completions"])) / 2
    assert seen["parts"]["reward/short"] == pytest.approx(expected)
    assert history[-1]["reward/short"] == pytest.approx(expected)
