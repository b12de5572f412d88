"""Environments from another package: the entry point group, `tmem-rl envs list`, an episode, `tmem-rl eval` and
`tmem-rl train` on a plugin's environments, and docs/environments.md, whose code is that plugin.

The plugin (tests/fixtures/tmem_plugin_example) is installed into the running environment once for the module, from
a copy, so that the build leaves nothing in the source tree, and uninstalled afterwards.
"""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tmem_rl import envs
from tmem_rl.envs import BUILTIN_ENVS, Action, ActionKind, InputError, env_sources, make_env
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.episode import EpisodeConfig, EpisodeRunner

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "tests" / "fixtures" / "tmem_plugin_example"
DOC = ROOT / "docs" / "environments.md"
PLUGIN_ENVS = {"notes": "tmem_plugin_example.notes:NotesEnv", "lookup": "tmem_plugin_example.lookup:LookupEnv"}
# Offline and quiet: the build uses this environment's setuptools instead of fetching one.
PIP_ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_NO_INDEX": "1"}


def pip(*args):
    proc = subprocess.run([sys.executable, "-m", "pip", *args], env=PIP_ENV, capture_output=True, text=True)
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def _forget_plugin():
    """Drop what this process imported or cached from the plugin, so that nothing outlives its install."""
    importlib.invalidate_caches()
    for name in [m for m in sys.modules if m.split(".")[0] == "tmem_plugin_example"]:
        del sys.modules[name]
    for name in PLUGIN_ENVS:
        envs._REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    source = tmp_path_factory.mktemp("plugin") / "tmem_plugin_example"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip("install", "--no-deps", "--no-build-isolation", "--quiet", str(source))
    importlib.invalidate_caches()
    yield
    pip("uninstall", "-y", "tmem-plugin-example")
    _forget_plugin()


@pytest.fixture
def one_thread():
    """Torch on one thread for a test: a tiny model gains nothing from more, and on a busy CPU the idle ones spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(*args, cwd):
    """`tmem-rl ARGS` in a fresh process, as a user runs it (cwd away from the checkout: the installed metadata)."""
    # One thread, as in one_thread.
    proc = subprocess.run([sys.executable, "-m", "tmem_rl.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"tmem-rl {' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def table(text: str) -> dict[str, list[list[str]]]:
    """`envs list` output -> {name: [cells of each row with that name]}; cells are separated by 2+ spaces."""
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "PACKAGE", "TARGET", "KIND"], text
    rows: dict[str, list[list[str]]] = {}
    for line in lines[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        rows.setdefault(cells[0], []).append(cells[1:])
    return rows


def fake_entry_points(monkeypatch, *registrations):
    """Installed metadata that holds exactly `registrations`: (name, target, package, version) each."""

    def entry_points(group):
        assert group == envs.ENTRY_POINT_GROUP
        return [SimpleNamespace(name=name, value=target, dist=SimpleNamespace(name=package, version=version))
                for name, target, package, version in registrations]

    monkeypatch.setattr(envs, "entry_points", entry_points)


# ---- the registry (no install needed) ----------------------------------------------------------------------------


def test_builtin_entry_points_match_the_list_a_source_checkout_uses():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["tmem_rl.envs"]
    assert declared == BUILTIN_ENVS


def test_without_installed_metadata_the_builtins_are_listed_as_built_in(monkeypatch):
    fake_entry_points(monkeypatch)
    rows = {s.name: s for s in env_sources() if s.package == "tmem_rl"}
    assert set(rows) == set(BUILTIN_ENVS)
    assert rows["facts"].origin == "tmem_rl (built in)" and rows["facts"].kind == "stream"
    assert make_env("facts", num_tasks=2).name == "facts"


def test_a_class_registered_in_process_is_listed_by_its_module(monkeypatch):
    class Scratch(envs.Environment):
        tools = {"peek": "look"}

    monkeypatch.setitem(envs._REGISTRY, "scratch", Scratch)
    (row,) = [s for s in env_sources() if s.name == "scratch"]
    assert (row.origin, row.target, row.kind) == (
        f"{__name__.split('.')[0]} (register_env)", f"{__name__}:{Scratch.__qualname__}", "tool")
    assert "scratch" in envs.available_envs()


def test_two_packages_registering_one_name_are_refused_by_name_and_both_listed(monkeypatch, capsys):
    fake_entry_points(monkeypatch,
                      ("twin", "tmem_rl.envs.facts:FactsEnv", "pkg-a", "1.0"),
                      ("twin", "tmem_rl.envs.locomo:LocomoEnv", "pkg-b", "2.3"),
                      ("facts", "tmem_rl.envs.facts:FactsEnv", "tmem_rl", "0.1.0"),
                      ("facts", "tmem_rl.envs.locomo:LocomoEnv", "pkg-c", "0.2"))
    with pytest.raises(InputError, match=r"'twin' is registered by more than one package: pkg-a 1\.0 "
                                         r"\(tmem_rl\.envs\.facts:FactsEnv\); pkg-b 2\.3 \(tmem_rl"):
        make_env("twin")
    # A built-in is no exception, even once it has been loaded in this process.
    clash = r"'facts' is registered by more than one package: tmem_rl 0\.1\.0.*pkg-c 0\.2"
    with pytest.raises(InputError, match=clash):
        make_env("facts")
    twins = [s for s in env_sources() if s.name == "twin"]
    assert [(s.package, s.conflicts) for s in twins] == [("pkg-a", ("pkg-b 2.3",)), ("pkg-b", ("pkg-a 1.0",))]
    from tmem_rl.cli import main

    assert main(["envs", "list"]) == 0
    rows = table(capsys.readouterr().out)
    assert [cells[0] for cells in rows["twin"]] == ["pkg-a 1.0", "pkg-b 2.3"]
    assert all(cells[-1] == f"CONFLICT: also registered by {other}"
               for cells, other in zip(rows["twin"], ["pkg-b 2.3", "pkg-a 1.0"]))
    assert "CONFLICT" not in " ".join(rows["locomo"][0])


def test_one_package_under_two_spellings_is_no_conflict(monkeypatch):
    fake_entry_points(monkeypatch, ("facts", "tmem_rl.envs.facts:FactsEnv", "tmem-rl", "0.1.0"))
    facts = [s for s in env_sources() if s.name == "facts"]
    assert [(s.origin, s.conflicts) for s in facts] == [("tmem-rl 0.1.0", ())]
    assert len(make_env("facts", num_tasks=2)) == 2


def test_a_plugin_that_fails_to_import_is_listed_with_its_error(monkeypatch, capsys):
    fake_entry_points(monkeypatch, ("broken", "tmem_no_such_package.envs:Env", "tmem-broken", "0.0.1"),
                      ("typo", "tmem_rl.envs.facts:FactEnv", "tmem-typo", "1.0"))
    rows = {s.name: s for s in env_sources()}
    assert rows["broken"].kind == "" and "ModuleNotFoundError" in rows["broken"].error
    assert "AttributeError" in rows["typo"].error and "FactEnv" in rows["typo"].error
    assert rows["facts"].kind == "stream", "the other rows are unaffected"
    from tmem_rl.cli import main

    assert main(["envs", "list"]) == 0
    listed = table(capsys.readouterr().out)
    assert listed["broken"][0][:2] == ["tmem-broken 0.0.1", "tmem_no_such_package.envs:Env"]
    assert listed["broken"][0][2].startswith("error: ModuleNotFoundError")


# A plugin that gets the contract wrong in one way or another, chosen by its `bad` setting.
COLORS = """\
from tmem_rl.envs.base import Environment, Task


class ColorsEnv(Environment):
    name = "colors"

    def __init__(self, bad: str = ""):
        self.bad = bad

    def __len__(self):
        return 2

    def task(self, index):
        fields = dict(task_id=f"colors-{index}", question="Which colour is the fish?", chunks=("One fish is red.",),
                      answers=("red",))
        if self.bad in ("chunks", "answers"):
            fields[self.bad] = {"chunks": "One fish is red.", "answers": "red"}[self.bad]
        return fields if self.bad == "dict" else Task(**fields)

    def score(self, task, prediction):
        reward = float("red" in prediction)
        return reward if self.bad == "score" else {"reward": reward, "f1": reward, "em": reward}
"""


@pytest.fixture
def plugin_module(monkeypatch, tmp_path):
    """write(name, code): an importable module `name` for fake entry points to name; forgotten afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    written = []

    def write(name: str, code: str) -> None:
        (folder / f"{name}.py").write_text(code)
        importlib.invalidate_caches()
        written.append(name)

    yield write
    for name in written:
        sys.modules.pop(name, None)
    for name in ("colors", "broken"):
        envs._REGISTRY.pop(name, None)


def error_line(err: str) -> str:
    """The one error message in a command's stderr (an evaluation's progress bar may precede it on its line)."""
    assert "Traceback" not in err and err.count("tmem-rl: error: ") == 1, err[-2000:]
    return err.split("tmem-rl: error: ")[1].split("\n")[0]


def test_a_plugin_whose_import_fails_is_one_line_naming_the_entry_point(monkeypatch, plugin_module, tmp_path,
                                                                        capsys):
    plugin_module("tmem_broken_plugin", "import tmem_no_such_dependency\n")
    fake_entry_points(monkeypatch, ("broken", "tmem_broken_plugin:BrokenEnv", "tmem-broken", "0.0.1"))
    expected = ("environment 'broken': cannot load entry point broken = tmem_broken_plugin:BrokenEnv (package "
                "tmem-broken 0.0.1): ModuleNotFoundError: No module named 'tmem_no_such_dependency'; run tmem-rl "
                "--debug for the traceback")
    from tmem_rl.cli import main

    assert main(["eval", "--env", "broken", "--out", str(tmp_path / "eval")]) == 2
    assert error_line(capsys.readouterr().err) == expected
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"env: {{name: broken}}\nouter_loop: {{output_dir: {tmp_path / 'run'}}}\n")
    assert main(["train", str(recipe)]) == 2
    assert error_line(capsys.readouterr().err) == expected
    # --debug, before the command or after it: the same line, after the traceback down to the plugin's import.
    for argv in (["--debug", "eval", "--env", "broken", "--out", str(tmp_path / "eval")],
                 ["train", str(recipe), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and 'tmem_broken_plugin.py", line 1' in err
        assert err.rstrip().splitlines()[-1] == f"tmem-rl: error: {expected}"
    assert main(["envs", "list"]) == 0, "the listing still shows every row"
    assert table(capsys.readouterr().out)["broken"][0][2].startswith("error: ModuleNotFoundError")


@pytest.mark.parametrize("bad, expected", [
    ("chunks", "environment 'colors': task 0: field 'chunks' must be a list or tuple of strings, got str 'One fish "
               "is red.' (a bare string would be read one character at a time)"),
    ("answers", "environment 'colors': task 0: field 'answers' must be a list or tuple of strings, got str 'red' (a "
                "bare string would be read one character at a time)"),
    ("dict", "environment 'colors': task 0: expected a tmem_rl.envs.base.Task, got dict {'task_id': 'colors-0', "
             "'question': 'Which colour is the ..."),
])
def test_a_plugin_task_of_the_wrong_shape_stops_eval_and_train_in_one_line(monkeypatch, plugin_module, tmp_path,
                                                                          capsys, bad, expected):
    plugin_module("tmem_colors_plugin", COLORS)
    fake_entry_points(monkeypatch, ("colors", "tmem_colors_plugin:ColorsEnv", "tmem-colors", "0.1"))
    from tmem_rl.cli import main

    # Checked where the environment is made: before any model loads (none is named that could).
    assert main(["eval", "--env", "colors", "--env-kwargs", json.dumps({"bad": bad}), "--model", "/no/model",
                 "--out", str(tmp_path / "eval")]) == 2
    assert error_line(capsys.readouterr().err) == expected
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{name: /no/model}}\nenv: {{name: colors, kwargs: {{bad: {bad}}}}}\n"
                      f"outer_loop: {{output_dir: {tmp_path / 'run'}}}\n")
    assert main(["train", str(recipe)]) == 2
    assert error_line(capsys.readouterr().err) == expected


def test_a_plugin_score_that_is_no_dict_of_metrics_stops_eval_in_one_line(monkeypatch, plugin_module, tmp_path,
                                                                         capsys, one_thread):
    plugin_module("tmem_colors_plugin", COLORS)
    fake_entry_points(monkeypatch, ("colors", "tmem_colors_plugin:ColorsEnv", "tmem-colors", "0.1"))
    from tmem_rl.cli import main

    assert main(["eval", "--env", "colors", "--env-kwargs", '{"bad": "score"}', "--model", "tiny", "--method", "none",
                 "--max-questions", "1", "--greedy", "--device", "cpu", "--out", str(tmp_path / "eval")]) == 2
    assert error_line(capsys.readouterr().err) == (
        "environment 'colors': score of task 'colors-0': expected a dict of metric name -> number with \"reward\", "
        "got float 0.0")


# ---- the installed plugin ----------------------------------------------------------------------------------------


def test_envs_list_shows_each_environment_with_its_package_and_kind(plugin, tmp_path):
    rows = table(cli("envs", "list", cwd=tmp_path))
    assert rows["notes"] == [["tmem-plugin-example 0.1.0", PLUGIN_ENVS["notes"], "stream"]]
    assert rows["lookup"] == [["tmem-plugin-example 0.1.0", PLUGIN_ENVS["lookup"], "tool"]]
    for name, target in BUILTIN_ENVS.items():
        assert [cells[:2] for cells in rows[name]] == [["tmem_rl 0.1.0", target]]
    assert rows["facts"][0][2] == rows["locomo"][0][2] == "stream"


def test_a_plugin_stream_environment_runs_an_episode(plugin, tiny, one_thread):
    env = make_env("notes", num_tasks=3)
    assert type(env).__module__ == "tmem_plugin_example.notes"
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(lr=0.05, epochs=1))
    runner = EpisodeRunner(model, tok, fast, EpisodeConfig(l_max=env.default_l_max, max_extraction_tokens=16,
                                                           max_answer_tokens=8))
    task = env.task(0)
    batch = runner.run(env, [task] * 2)
    assert [t.task_id for t in batch.trajectories] == [task.task_id] * 2
    for traj in batch.trajectories:
        assert any(s.kind == "extraction" for s in traj.segments), "the notes run past default_l_max"
        assert traj.segments[-1].kind == "answer"
        assert traj.reward == env.score(task, traj.prediction)["reward"]


def test_a_plugin_tool_environment_answers_tool_calls_through_step(plugin):
    env = make_env("lookup")
    task = env.task(0)
    person = next(p for p in task.metadata["directory"] if p.split()[0] in task.question)
    state, observation = env.reset(task)
    assert observation.text == task.question and task.chunks == ()
    result = env.step(state, Action(ActionKind.TOOL, f"  {person.lower()} ", tool="lookup"))
    assert result.observation.text == f"{person}: room {task.metadata['directory'][person]}"
    assert env.step(state, Action(ActionKind.TOOL, "Nobody", tool="lookup")).observation.text == "no entry for 'Nobody'"
    assert state.tool_calls == 2
    done = env.step(state, Action(ActionKind.ANSWER, task.answers[0]))
    assert done.done and done.reward == 1.0


def test_a_plugin_tool_environment_runs_an_episode(plugin, tiny, one_thread):
    env = make_env("lookup", num_tasks=2)
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(lr=0.05, epochs=1))
    runner = EpisodeRunner(model, tok, fast, EpisodeConfig(l_max=env.default_l_max, max_action_tokens=12,
                                                           max_extraction_tokens=16, max_answer_tokens=8))
    task = env.task(1)
    batch = runner.run(env, [task] * 2)
    assert len(batch.trajectories) == 2
    for traj in batch.trajectories:
        assert "action" in {s.kind for s in traj.segments}
        assert 1 <= traj.turns <= env.max_turns
        assert traj.reward == env.score(task, traj.prediction)["reward"]


def test_eval_runs_methods_side_by_side_on_a_plugin_environment(plugin, tmp_path):
    out = tmp_path / "eval"
    # No --l-max: the environment's default_l_max applies, and the notes run past it.
    cli("eval", "--env", "notes", "--model", "tiny", "--method", "none", "tmem", "--max-questions", 2, "--greedy",
        "--max-pairs", 2, "--inner-epochs", 1, "--device", "cpu", "--out", out, cwd=tmp_path)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["question_id"]) for r in records) == [
        (method, f"notes-0-{i}") for method in ("none", "tmem") for i in (0, 1)]
    assert all(r["extractions"] for r in records if r["method"] == "tmem")
    assert json.loads((out / "config.json").read_text())["episode"]["l_max"] == 32
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"none", "tmem"} and summary["none"]["n"] == summary["tmem"]["n"] == 2
    assert summary["none"]["parse_rate"] is None and summary["tmem"]["parse_rate"] is not None


def test_train_weighs_a_reward_function_given_by_dotted_path(plugin, tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
model: {{name: tiny}}
env: {{name: notes, kwargs: {{num_tasks: 4}}}}
reward_funcs: {{brevity: "tmem_plugin_example.rewards:brevity"}}
inner_loop: {{lr: 0.05, epochs: 1}}
episode: {{l_max: 32, max_pairs: 2, max_extraction_tokens: 8, max_answer_tokens: 6}}
outer_loop:
  output_dir: {out}
  max_steps: 1
  save_steps: 0
  questions_per_step: 1
  num_generations: 2
  max_completion_length: 8
  report_to: []
  reward_weights: {{outcome: 1.0, brevity: 0.1}}
""")
    cli("train", recipe, cwd=tmp_path)
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics["step"] == 1 and 0.0 < metrics["reward/brevity"] <= 1.0


# ---- the tutorial ------------------------------------------------------------------------------------------------

FILE_BLOCK = re.compile(r"<!-- file: (?P<path>\S+) -->\n```[a-z]*\n(?P<code>.*?)^```$", re.DOTALL | re.MULTILINE)


def test_the_tutorial_code_is_the_example_plugin_file_for_file():
    blocks = {m["path"]: m["code"] for m in FILE_BLOCK.finditer(DOC.read_text())}
    for path, code in blocks.items():
        assert code == (ROOT / path).read_text(), f"docs/environments.md: the block for {path} differs from the file"
    package = {str(p.relative_to(ROOT)) for p in PLUGIN.rglob("*") if p.suffix in (".py", ".toml")
               and not {"build", "__pycache__"} & set(p.parts) and ".egg-info" not in str(p)}
    assert package and package == set(blocks), "every file of the example plugin appears in the tutorial"
