"""Tool environments: the action format, the turn loop, the budget in it, and what the outer loop trains on."""

import pytest
import torch

from tmem_rl.actions import ANSWER, MALFORMED, TOOL, parse_action
from tmem_rl.envs.base import Environment, Task
from tmem_rl.logprobs import segment_rows
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.metrics.qa import token_f1
from tmem_rl.episode import EpisodeBatch, EpisodeConfig
from tmem_rl.episode.sampler import through_closing_tag

from test_rollout import ScriptedGeneration

TOOLS = {"search": "search the notes"}


# ---- the action format -------------------------------------------------------------------------------------------


def test_a_well_formed_tool_call_and_answer_parse():
    call = parse_action("<search>  founding year of Velmora </search>", TOOLS)
    assert (call.kind, call.name, call.argument, call.ignored) == (TOOL, "search", "founding year of Velmora", 0)
    answer = parse_action("Thinking done. <answer>1987; Port Aldane</answer>", TOOLS)
    assert (answer.kind, answer.name, answer.argument) == (ANSWER, "answer", "1987; Port Aldane")
    assert answer.end == len("Thinking done. <answer>1987; Port Aldane</answer>")


def test_several_calls_run_the_first_and_count_the_rest():
    action = parse_action("<search>a</search><search>b</search><answer>c</answer>", TOOLS)
    assert (action.kind, action.argument, action.ignored) == (TOOL, "a", 2)
    action = parse_action("<answer>x</answer> then <search>y</search>", TOOLS)
    assert (action.kind, action.argument, action.ignored) == (ANSWER, "x", 1)


@pytest.mark.parametrize("text, says", [
    ("", "empty"),
    ("I would like to look it up.", "No action found"),
    ("<search>unfinished query", "never closed"),
    ("<lookup>Velmora</lookup>", "Unknown action <lookup>"),
    ("<search>   </search>", "is empty"),
    ("<search>a</answer>", "never closed"),
])
def test_malformed_actions_say_why(text, says):
    action = parse_action(text, TOOLS)
    assert action.kind == MALFORMED and says in action.error
    assert "<search>...</search>" in action.error or "empty" in action.error


def test_an_unknown_tag_before_a_known_one_does_not_hide_it():
    action = parse_action("<note>x</note><search>q</search>", TOOLS)
    assert (action.kind, action.argument) == (TOOL, "q")


# ---- the turn loop -----------------------------------------------------------------------------------------------


class NotesEnv(Environment):
    """Two long notes behind a search tool: two searches put the working context over a small budget."""

    name = "notes-test"
    tools = TOOLS
    max_turns = 4
    NOTES = {
        "alpha": "Alpha note. " + "The harbour of Alpha is quiet in winter. " * 6 + "Alpha's code is 4417.",
        "beta": "Beta note. " + "Beta has a long avenue of plane trees. " * 6 + "Beta's code is 9021.",
    }

    def __len__(self):
        return 2

    def task(self, index):
        return Task(f"t{index}", "What are the codes of Alpha and Beta?", (), ("4417; 9021",))

    def call_tool(self, state, tool, argument):
        return self.NOTES.get(argument.strip().lower(), "no such note")

    def score(self, task, prediction):
        f1 = token_f1(prediction, task.answers[0])
        return {"reward": f1, "f1": f1, "em": float(f1 == 1.0)}


class ScriptedToolRunner(ScriptedGeneration):
    """The real runner with a scripted policy: each rollout's actions in order, a fixed extraction."""

    extraction_text = ' {"instruction": "What is the code of Alpha?", "output": "4417"}]'

    def __init__(self, *args, script, **kwargs):
        super().__init__(*args, **kwargs)
        self.script = {g: list(actions) for g, actions in script.items()}
        self.calls = []

    def generate(self, prompts, slots, max_new_tokens, sample, temperature, stop_strings=None, stopping=None):
        if max_new_tokens == self.config.max_action_tokens:
            texts = [self.script[g].pop(0) for g in slots]
            self.calls.append(("action", list(slots)))
        elif max_new_tokens == self.config.max_extraction_tokens:
            texts = [self.extraction_text] * len(prompts)
            self.calls.append(("extraction", list(slots)))
        elif max_new_tokens == self.config.summary_tokens:
            texts = ["Alpha code 4417."] * len(prompts)
            self.calls.append(("summary", list(slots)))
        else:
            texts = ["forced 4417"] * len(prompts)
            self.calls.append(("answer", list(slots)))
        eos = self.tokenizer.eos_token_id
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]


def _runner(tiny, script, rollouts=1, **episode):
    model, tok = tiny
    fast = FastWeights(model, rollouts, FastWeightConfig(lr=0.05, epochs=2))
    settings = dict(l_max=120, grounding=True, record_logprobs=True, max_action_tokens=48, max_answer_tokens=16,
                    prefill=False)
    settings.update(episode)
    return ScriptedToolRunner(model, tok, fast, EpisodeConfig(**settings), script=script), fast


def _tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_searches_twice_extracts_over_budget_and_answers(tiny):
    env = NotesEnv()
    _, tok = tiny
    beta_piece = "<search>beta</search>\n" + env.NOTES["beta"]
    alpha_piece = "<search>alpha</search>\n" + env.NOTES["alpha"]
    # The budget holds one search result but not two: the second search must trigger the extraction.
    l_max = _tokens(tok, alpha_piece) + 10
    assert _tokens(tok, alpha_piece) + _tokens(tok, beta_piece) > l_max
    script = {0: ["<search>alpha</search>", "<search>beta</search> and then more words", "<answer>4417; 9021</answer>"]}
    runner, fast = _runner(tiny, script, l_max=l_max)
    batch = runner.run(env, [env.task(0)])
    traj = batch.trajectories[0]

    assert [s.kind for s in traj.segments] == ["action", "action", "extraction", "answer"]
    assert [c[0] for c in runner.calls] == ["action", "action", "extraction", "action"]
    assert traj.turns == 3 and traj.malformed_actions == 0
    assert [a.kind for a in traj.actions] == ["tool", "tool", "answer"]
    assert [a.argument for a in traj.actions[:2]] == ["alpha", "beta"]
    assert traj.prediction == "4417; 9021" and traj.reward == 1.0
    # The extraction saw both results; it fired after turn 2, and the answer ran under the absorbed pair.
    extraction = traj.segments[2]
    assert extraction.chunk_index == 1  # after the second turn
    prompt = tok.decode(extraction.prompt_ids)
    assert "Alpha's code is 4417" in prompt and "Beta's code is 9021" in prompt
    assert traj.extractions[0].supervision.pairs[0].output == "4417"
    assert fast.versions[0] == 1
    answer = traj.segments[3]
    assert (answer.fast_weight_version, answer.snapshot) == (1, "0/1")
    assert answer.snapshot in batch.snapshots
    # The context was cleared: the last turn's prompt no longer holds either result.
    last_prompt = tok.decode(answer.prompt_ids)
    assert "4417" not in last_prompt.split("Question:")[-1].replace("Alpha and Beta", "")
    assert "(nothing yet)" in last_prompt
    # The first two turns ran on the base model; the second saw the first result.
    assert [s.fast_weight_version for s in traj.segments[:2]] == [0, 0]
    assert "Alpha's code is 4417" in tok.decode(traj.segments[1].prompt_ids)
    # Generation stopped at the closing tag: what followed it is not part of the action.
    second = tok.decode(traj.segments[1].completion_ids)
    assert second.rstrip().endswith("</search>") and "more words" not in second
    assert len(traj.segments[1].logprobs) == len(traj.segments[1].completion_ids)


def test_explicit_notes_show_the_absorbed_pairs_in_later_turns(tiny):
    """TMEM + explicit memory in the turn loop: after the absorb, the pair is in the fast weights and in the prompt."""
    env = NotesEnv()
    _, tok = tiny
    l_max = _tokens(tok, "<search>alpha</search>\n" + env.NOTES["alpha"]) + 10
    script = {0: ["<search>alpha</search>", "<search>beta</search>", "<answer>4417; 9021</answer>"]}
    prompts = {}
    for notes in (0, 3):
        runner, fast = _runner(tiny, {g: list(a) for g, a in script.items()}, l_max=l_max, explicit_notes=notes)
        traj = runner.run(env, [env.task(0)]).trajectories[0]
        assert fast.versions[0] == 1 and [s.kind for s in traj.segments] == ["action", "action", "extraction", "answer"]
        prompts[notes] = tok.decode(traj.segments[3].prompt_ids)
    assert "Notes:\n- What is the code of Alpha? 4417" in prompts[3]
    assert "Notes:" not in prompts[0] and "(nothing yet)" in prompts[0]


def test_an_action_prefilled_with_a_bracket_continues_the_tag(tiny):
    env = NotesEnv()
    runner, _ = _runner(tiny, {0: ["search>alpha</search>", "answer>4417</answer>"]}, l_max=10_000, prefill=True)
    traj = runner.run(env, [env.task(0)]).trajectories[0]
    _, tok = tiny
    assert [a.kind for a in traj.actions] == ["tool", "answer"] and traj.prediction == "4417"
    assert tok.decode(traj.segments[0].prompt_ids).endswith("assistant\n<")
    assert traj.segments[0].text == "search>alpha</search>"  # what was generated; the "<" is prompt
    assert "<search>alpha</search>\nAlpha note." in tok.decode(traj.segments[1].prompt_ids)


def test_malformed_actions_become_observations_and_are_counted(tiny, tmp_path):
    env = NotesEnv()
    script = {0: ["let me think", "<lookup>alpha</lookup>", "<search>alpha</search>", "<answer>4417</answer>"]}
    runner, _ = _runner(tiny, script, l_max=10_000)
    batch = runner.run(env, [env.task(0)])
    traj = batch.trajectories[0]
    _, tok = tiny
    assert traj.malformed_actions == 2 and traj.turns == 4
    assert [a.kind for a in traj.actions] == ["malformed", "malformed", "tool", "answer"]
    assert "Unknown action <lookup>" in traj.actions[1].error and traj.actions[2].tool == "search"
    batch.save(tmp_path)
    assert EpisodeBatch.load(tmp_path).trajectories[0].actions == traj.actions
    second_prompt = tok.decode(traj.segments[1].prompt_ids)
    assert "let me think" in second_prompt and "No action found" in second_prompt
    third_prompt = tok.decode(traj.segments[2].prompt_ids)
    assert "Unknown action <lookup>" in third_prompt
    assert traj.prediction == "4417"


def test_the_turn_limit_asks_for_the_answer(tiny):
    env = NotesEnv()
    runner, _ = _runner(tiny, {0: ["<search>alpha</search>"] * env.max_turns, 1: ["<answer>9021</answer>"]},
                        rollouts=2, l_max=10_000)
    batch = runner.run(env, [env.task(0), env.task(1)])
    searcher, answerer = batch.trajectories
    assert searcher.turns == env.max_turns
    assert [s.kind for s in searcher.segments] == ["action"] * env.max_turns + ["answer"]
    assert searcher.actions[-1].kind == "forced_answer" and searcher.prediction == "forced 4417"
    # The forced answer uses the environment's answer prompt with the working context.
    _, tok = tiny
    assert "Alpha's code is 4417" in tok.decode(searcher.segments[-1].prompt_ids)
    assert "Actions left: 1. This is your last action" in tok.decode(searcher.segments[-2].prompt_ids)
    # The other rollout answered at once and took no further turn.
    assert answerer.turns == 1 and answerer.prediction == "9021"
    assert runner.calls[0] == ("action", [0, 1]) and runner.calls[1] == ("action", [0])


def test_environment_text_gets_no_loss(tiny):
    """The loss mask covers the agent's own tokens and nothing the environment wrote."""
    env = NotesEnv()
    _, tok = tiny
    script = {0: ["<search>alpha</search>", "<search>beta</search>", "<answer>4417; 9021</answer>"]}
    runner, _ = _runner(tiny, script, l_max=_tokens(tok, env.NOTES["alpha"]) + 30)
    traj = runner.run(env, [env.task(0)]).trajectories[0]
    rows = segment_rows(traj.segments, tok.pad_token_id, "cpu")
    width = rows.completion_ids.shape[1]
    for i, segment in enumerate(traj.segments):
        masked = rows.input_ids[i, -width:][rows.completion_mask[i].bool()].tolist()
        assert masked == segment.completion_ids
        trained = tok.decode(masked)
        context = tok.decode(rows.input_ids[i][rows.attention_mask[i].bool()].tolist()[: -len(masked)])
        for note in env.NOTES.values():
            assert note[-20:] not in trained  # no observation text under the loss...
        if segment.kind == "action" and i > 0 or segment.kind == "extraction":
            assert any(note[-20:] in context for note in env.NOTES.values())  # ...it is only ever context
    assert sum(rows.completion_mask.sum(1).tolist()) == sum(len(s.completion_ids) for s in traj.segments)


# ---- the baselines' memory in the same loop ----------------------------------------------------------------------


@pytest.mark.parametrize("memory", ["none", "window", "full", "summary"])
def test_memory_modes_in_the_turn_loop(tiny, memory):
    env = NotesEnv()
    _, tok = tiny
    l_max = _tokens(tok, "<search>alpha</search>\n" + env.NOTES["alpha"]) + 10
    script = {0: ["<search>alpha</search>", "<search>beta</search>", "<answer>x</answer>"]}
    runner, fast = _runner(tiny, script, l_max=l_max, memory=memory)
    traj = runner.run(env, [env.task(0)]).trajectories[0]
    last_prompt = tok.decode(traj.segments[-1].prompt_ids)
    assert fast.versions[0] == 0 and all(s.fast_weight_version == 0 for s in traj.segments)
    assert "extraction" not in [s.kind for s in traj.segments]
    has_alpha, has_beta = "Alpha's code is 4417" in last_prompt, "Beta's code is 9021" in last_prompt
    if memory == "none":
        assert not has_alpha and not has_beta and "(nothing yet)" in last_prompt
    elif memory == "window":
        assert not has_alpha and has_beta  # the oldest result went first
    elif memory == "full":
        assert has_alpha and has_beta
    else:
        assert [s.kind for s in traj.segments] == ["action", "action", "summary", "answer"]
        assert "Notes:\nAlpha code 4417." in last_prompt and not has_beta


def test_window_cuts_a_single_piece_longer_than_the_budget(tiny):
    env = NotesEnv()
    runner, _ = _runner(tiny, {0: ["<search>alpha</search>", "<answer>x</answer>"]}, l_max=20, memory="window")
    traj = runner.run(env, [env.task(0)]).trajectories[0]
    _, tok = tiny
    prompt = tok.decode(traj.segments[-1].prompt_ids)
    assert "Alpha's code is 4417" in prompt and "Alpha note." not in prompt


# ---- the outer loop on a tool environment ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_a_training_step_on_a_tool_environment(tiny, tmp_path, algorithm):
    from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer
    from tmem_rl.trainers.ppo import PPOConfig, PPOTrainer

    model, tok = tiny
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (PPOConfig, PPOTrainer)
    config = config_cls(output_dir=str(tmp_path), max_steps=1, questions_per_step=1, num_generations=2,
                        learning_rate=1e-3, report_to=[], save_steps=0, micro_batch_size=4, temperature=1.0,
                        reward_weights={"outcome": 1.0, "rollout": 1.0})
    env = NotesEnv()
    env.max_turns = 2
    # A random model scores 0 everywhere; a reward that differs within the group gives the step a gradient.
    by_rollout = {"rollout": lambda trajectories, **_: [float(t["rollout"]) for t in trajectories]}
    trainer = trainer_cls(config, model, tok, env, FastWeightConfig(lr=0.05, epochs=1),
                          EpisodeConfig(l_max=40, max_action_tokens=12, max_extraction_tokens=24,
                                        max_answer_tokens=8, grounding=False), reward_funcs=by_rollout)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    batch = trainer.generate_rollouts(0)
    actions = [s for t in batch.trajectories for s in t.segments if s.kind == "action"]
    assert actions, "the rollouts must take action turns"
    metrics = trainer.train_step(batch)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    # Every generated token, action turns included, is in the loss.
    generated = sum(len(s.completion_ids) for t in batch.trajectories for s in t.segments)
    assert metrics["completion_tokens"] == generated
    changed = [n for n, p in trainer.policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed


# ---- evaluation ----------------------------------------------------------------------------------------------------


@pytest.fixture
def registered_notes():
    from tmem_rl.envs import _REGISTRY, register_env

    register_env(NotesEnv.name)(NotesEnv)
    yield NotesEnv.name
    _REGISTRY.pop(NotesEnv.name, None)


AGENT_METHODS = ["none", "full-context", "summary", "tmem", "tmem+explicit"]


def eval_agent_methods(out, env, l_max, **env_kwargs):
    """`run_eval` of every method a tool environment takes, on the tiny model with short budgets: (summary,
    records), after checking that every method has a row and each of the environment's 2 tasks a record."""
    from tmem_rl.evaluation.harness import EvalConfig, read_records, run_eval

    summary = run_eval(EvalConfig(out=str(out), env=env, env_kwargs=env_kwargs, model="tiny", methods=AGENT_METHODS,
                                  device="cpu",
                                  episode=EpisodeConfig(l_max=l_max, max_answer_tokens=8, max_extraction_tokens=16,
                                                        max_action_tokens=8, summary_tokens=8)))
    assert list(summary) == AGENT_METHODS
    records = read_records(out / "results.jsonl")
    assert len(records) == 2 * len(AGENT_METHODS)
    return summary, records


def test_eval_runs_every_agent_method_through_the_turn_loop(registered_notes, tmp_path):
    methods = AGENT_METHODS
    summary, records = eval_agent_methods(tmp_path, registered_notes, l_max=40)
    for record in records:
        assert 1 <= record["turns"] <= NotesEnv.max_turns
        assert record["turns"] == len([a for a in record["actions"] if a["kind"] != "forced_answer"])
        assert record["forced_answer"] == (record["actions"][-1]["kind"] == "forced_answer")
    by_method = {m: [r for r in records if r["method"] == m] for m in methods}
    # A random model's turns run past the small budget: tmem extracts there, and summary rewrites its notes.
    assert any(r["extractions"] for r in by_method["tmem"])
    assert not any(r["extractions"] for r in by_method["none"] + by_method["full-context"])
    assert any(r["summaries"] for r in by_method["summary"])
    for method in methods:
        assert summary[method]["turns"] == sum(r["turns"] for r in by_method[method]) / 2
    assert "turns" in (tmp_path / "summary.md").read_text()


def test_eval_refuses_what_a_tool_environment_cannot_do(registered_notes, tmp_path):
    from tmem_rl.errors import InputError
    from tmem_rl.evaluation.harness import EvalConfig, run_eval

    with pytest.raises(InputError, match="retrieval do not apply to the tool environment"):
        run_eval(EvalConfig(out=str(tmp_path / "a"), env=registered_notes, model="tiny", methods=["retrieval"]))
    with pytest.raises(InputError, match="use episode_unit question"):
        run_eval(EvalConfig(out=str(tmp_path / "b"), env=registered_notes, model="tiny",
                            episode_unit="conversation"))
    assert not (tmp_path / "a").exists()


def test_eval_takes_the_environments_budget_unless_given(registered_notes, tmp_path, monkeypatch):
    from tmem_rl.evaluation import harness

    seen = []
    monkeypatch.setattr(harness, "evaluate_policy", lambda config, *a, **k: seen.append(config.episode.l_max))
    monkeypatch.setattr(harness, "load_policy", lambda *a, **k: (None, None))
    monkeypatch.setattr(NotesEnv, "default_l_max", 8192)
    harness.run_eval(harness.EvalConfig(out=str(tmp_path / "a"), env=registered_notes, model="tiny"))
    harness.run_eval(harness.EvalConfig(out=str(tmp_path / "b"), env=registered_notes, model="tiny",
                                        episode={"l_max": 512}))
    monkeypatch.setattr(NotesEnv, "default_l_max", None)
    harness.run_eval(harness.EvalConfig(out=str(tmp_path / "c"), env=registered_notes, model="tiny"))
    assert seen == [8192, 512, 4096]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_the_search_recipe_trains_a_step(tmp_path, algorithm):
    """The CPU search recipe as a user runs it (`tmem-rl train`), on the tiny model and a short episode."""
    import json
    from pathlib import Path

    from tmem_rl.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "search_grpo_cpu.yaml"
    out = tmp_path / "run"
    overrides = ["model.name=tiny", f"outer_loop.output_dir={out}", f"algorithm={algorithm}",
                 "outer_loop.max_steps=1", "outer_loop.num_generations=2", "outer_loop.save_steps=1",
                 "env.kwargs.max_turns=2", "episode.l_max=300", "episode.max_action_tokens=8",
                 "episode.max_extraction_tokens=16", "episode.max_answer_tokens=8", "inner_loop.epochs=1"]
    assert main(["train", str(recipe), *overrides]) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["step"] == 1 and 1 <= metrics["turns"] <= 2
    # Each rollout's turns are its tool calls, its malformed actions and its answer action unless the limit forced
    # one.
    answered_by_action = 1 - metrics["forced_answers"]
    assert metrics["tool_calls"] + metrics["malformed_actions"] + answered_by_action == pytest.approx(metrics["turns"])
    assert (out / "checkpoint-1" / "manifest.json").exists()


def test_a_split_of_a_tool_environment_is_the_same_tool_environment():
    from tmem_rl.envs.split import TaskSplit

    env = NotesEnv()
    env.default_l_max = 777
    half = TaskSplit(env, "train", 0.5, seed=3)
    assert (half.tools, half.max_turns, half.default_l_max) == (env.tools, env.max_turns, 777)
    task = env.task(0)
    assert half.instructions(task) == env.instructions(task)
    assert half.turn_prompt(task, "ctx", 2) == env.turn_prompt(task, "ctx", 2)
    state, _ = half.reset(task)
    assert half.call_tool(state, "search", "alpha") == env.NOTES["alpha"]
    # Whatever the base class defines, the split must take from the wrapped environment, not inherit the default.
    inherited = [name for name, value in vars(Environment).items()
                 if not name.startswith("_") and name not in vars(TaskSplit) and name not in vars(half)]
    assert inherited == ["tasks"], inherited  # tasks() goes through the split's own task()


def test_rewards_the_environment_gives_on_extractions_and_tool_calls_add_to_the_return(tiny):
    from tmem_rl.envs.base import ActionKind, StepResult

    class Shaping(NotesEnv):
        def step(self, state, action):
            result = super().step(state, action)
            bonus = {ActionKind.TOOL: -0.25, ActionKind.EXTRACT: 0.1}.get(action.kind, 0.0)
            return StepResult(result.observation, result.reward + bonus, result.done, result.info)

    env = Shaping()
    _, tok = tiny
    script = {0: ["<search>alpha</search>", "<search>beta</search>", "<answer>4417; 9021</answer>"]}
    runner, _ = _runner(tiny, script, l_max=_tokens(tok, "<search>alpha</search>\n" + env.NOTES["alpha"]) + 10)
    traj = runner.run(env, [env.task(0)]).trajectories[0]
    assert [s.kind for s in traj.segments].count("extraction") == 1
    assert traj.metrics["reward"] == 1.0  # the answer's own score
    assert traj.shaping_reward == pytest.approx(-0.25 * 2 + 0.1)
    assert traj.reward == pytest.approx(1.0 - 0.5 + 0.1)


def test_an_action_turn_ends_at_its_first_closing_tag_and_keeps_a_generated_end_token(tiny):
    model, tok = tiny
    closing = ["</search>", "</answer>"]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    # Padding after a stop (here the pad is the end token) is not part of the action.
    cut = through_closing_tag(tok, ids("search>velmora founding</search>") + [eos, eos, eos], closing)
    assert tok.decode(cut).endswith("</search>") and eos not in cut
    # The first closing tag of any kind ends the turn, as a stop string does, even when a later call would parse.
    cut = through_closing_tag(tok, ids("search>a</answer><search>b</search>"), closing)
    # (a token may run past the tag: "><" is one token here, and a stop string ends after it too)
    assert "</answer>" in tok.decode(cut) and "search>b" not in tok.decode(cut)
    assert "</answer>" not in tok.decode(cut[:-1])
    # No tag: the completion is kept as generated, its end token too.
    assert through_closing_tag(tok, [eos], closing) == [eos]
    assert through_closing_tag(tok, ids("hello") + [eos], closing) == ids("hello") + [eos]
