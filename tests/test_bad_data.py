"""Hostile input, generated: whatever a user hands over (a data file, a recipe, overrides, command-line flags), the
answer is a result or an InputError, never another exception; whatever a model writes, the parser returns a record.

Each property runs a modest number of examples with no deadline, so that the file stays quick on two cores.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tmem_rl.cli import main
from tmem_rl.envs import Action, ActionKind, ContractError, Environment, Observation, StepResult, Task, make_env
from tmem_rl.envs.locomo import LocomoEnv, load_locomo
from tmem_rl.errors import InputError
from tmem_rl.extraction import parse_qa_pairs

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "locomo_tiny.json"
SAMPLES = json.loads(FIXTURE.read_text())
RECIPE = REPO / "recipes" / "quickstart_cpu.yaml"


@contextlib.contextmanager
def data_file(content: bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.json"
        path.write_bytes(content)
        yield path


def assert_one_line(err: InputError) -> None:
    assert "\n" not in str(err) and str(err).strip()


# ----------------------------------------------------------------------------------------------------------------
# Building blocks: text with surrogates, JSON values, the pieces that broke loaders before
# ----------------------------------------------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=30)  # surrogates included
HOSTILE_SNIPPETS = st.sampled_from([
    "\\ud800", "\\udfff", "\ud800", "7" * 4301, "-" + "1" * 5000, "[" * 3000, "{" * 3000, "\x00", "\ufeff", "NaN",
    "Infinity", "1e999", '"', "\\", ",", ":", "]", "}", "null", "true", "\n", "\t", "\\u12", "\\x41",
])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=True) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT | st.sampled_from(
        ["sample_id", "conversation", "qa", "speaker_a", "speaker_b", "session_1", "session_1_date_time", "text",
         "speaker", "dia_id", "question", "answer", "category", "evidence", "adversarial_answer", "blip_caption"]),
        inner, max_size=4),
    max_leaves=12,
)


def encode(text: str) -> bytes:
    # surrogatepass: a lone surrogate written raw gives bytes that are not UTF-8, one more way a file can be bad.
    return text.encode("utf-8", "surrogatepass")


@st.composite
def mutated_samples(draw) -> bytes:
    """The fixture with values replaced at random paths, serialised with or without ASCII escapes."""
    raw = copy.deepcopy(SAMPLES)
    for _ in range(draw(st.integers(1, 4))):
        node = raw
        for _ in range(draw(st.integers(1, 6))):  # walk down to a random container, then replace one child
            keys = list(range(len(node))) if isinstance(node, list) else list(node)
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            if isinstance(node[key], (list, dict)) and draw(st.booleans()):
                node = node[key]
                continue
            node[key] = draw(JSON_VALUES)
            break
    return encode(json.dumps(raw, ensure_ascii=draw(st.booleans())))


@st.composite
def spliced_text(draw, base: str) -> bytes:
    """`base` with hostile snippets spliced in at random places and random spans cut out."""
    text = base
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 20))
        text = text[:at] + draw(HOSTILE_SNIPPETS | ANY_TEXT) + text[at + cut:]
    return encode(text)


DATA_FILES = mutated_samples() | spliced_text(FIXTURE.read_text()) | st.binary(max_size=300) | JSON_VALUES.map(
    lambda v: encode(json.dumps(v)))


# ----------------------------------------------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------------------------------------------


@FUZZ
@given(content=DATA_FILES)
def test_the_locomo_loader_raises_only_input_errors(content):
    with data_file(content) as path:
        try:
            env = LocomoEnv(str(path))
        except InputError as err:
            assert_one_line(err)
            assert str(path) in str(err)
            return
        # What loads is usable: every task renders, prompts and scores, and its text has a UTF-8 form.
        for task in env.tasks():
            prompt = env.answer_prompt(task.question, "\n".join(task.chunks), task)
            prompt.encode("utf-8")
            assert set(env.score(task, task.answers[0])) >= {"f1", "em"}
        assert len(load_locomo(path)) >= 1


@FUZZ
@given(kwargs=st.dictionaries(st.sampled_from(["data", "sample_ids", "max_questions", "seed", "per_category",
                                               "sample_id", "max_question", "num_tasks"]),
                              JSON_VALUES, max_size=3))
def test_locomo_settings_raise_only_input_errors(kwargs):
    kwargs = {**kwargs, "data": str(FIXTURE)} if "data" not in kwargs or kwargs["data"] is None else kwargs
    try:
        env = make_env("locomo", **kwargs)
    except InputError as err:
        assert_one_line(err)
        return
    assert len(env.tasks()) == len(env)


@FUZZ
@given(kwargs=st.dictionaries(st.sampled_from(["num_tasks", "num_facts", "num_distractors", "lines_per_chunk",
                                               "fact_position", "seed", "num_fact", "data"]),
                              JSON_VALUES | st.integers(0, 8), max_size=3))
def test_facts_settings_raise_only_input_errors(kwargs):
    try:
        env = make_env("facts", **kwargs)
    except InputError as err:
        assert_one_line(err)
        return
    assume(len(env) <= 64)  # a valid but large num_tasks says nothing more, only slower
    env.task(len(env) - 1)


def test_a_misspelt_facts_setting_names_the_key_and_the_accepted_ones():
    with pytest.raises(InputError) as err:
        make_env("facts", num_fact=3)
    assert "environment 'facts': unknown setting(s) 'num_fact'; accepted: num_tasks, num_facts" in str(err.value)
    with pytest.raises(InputError, match=r"unknown environment 'fact' \(did you mean 'facts'\?\); available: "
                                         "context_learning, dataset, dialogues, facts, hotpotqa, locomo"):
        make_env("fact")
    with pytest.raises(InputError, match=r"unknown environment 'zzz'; available: "):
        make_env("zzz")
    # A count past what len() or a context can hold fails at once instead of deep inside evaluation.
    with pytest.raises(InputError, match="num_tasks must be at most"):
        make_env("facts", num_tasks=10**30)
    with pytest.raises(InputError, match="num_distractors must be at most"):
        make_env("facts", num_distractors=10**9)


# ----------------------------------------------------------------------------------------------------------------
# Model output
# ----------------------------------------------------------------------------------------------------------------

MODEL_TEXT = st.lists(HOSTILE_SNIPPETS | ANY_TEXT | st.sampled_from(
    ['[{"instruction": "', '", "output": "', '"}', "```json\n", "```"]), max_size=30).map("".join)


@FUZZ
@given(text=MODEL_TEXT | ANY_TEXT, prefilled=st.booleans(), source=st.none() | ANY_TEXT)
def test_the_parser_reads_any_text_without_its_last_resort(text, prefilled, source):
    record = parse_qa_pairs(text, prefilled=prefilled, source=source)
    # The catch-all in parse_qa_pairs is a safety net: reaching it means a case the parser did not foresee.
    assert not (record.error or "").startswith("parser error"), record.error
    assert record.pairs or record.error
    for pair in record.pairs:
        (pair.instruction + pair.output).encode("utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Recipes and overrides
# ----------------------------------------------------------------------------------------------------------------

SECTIONS = {"model": ["name", "dtype"], "env": ["name", "kwargs", "heldout_fraction", "split_seed"],
            "inner_loop": ["rank", "lr", "epochs", "layers", "target_modules", "init"],
            "episode": ["l_max", "max_pairs", "chat_template_kwargs"],
            "outer_loop": ["max_steps", "learning_rate", "num_generations", "output_dir"]}
YAML_SCALARS = st.sampled_from(["1", "-1", "0", "1e-5", "1.0e-3", "yes", "no", "~", "null", "[]", "{}", "[1, 2]",
                                "'text'", '"\\ud800"', "7" * 5000, "!!binary aGk=", "2024-01-01", ".inf", ".nan",
                                "&a 1", "*a", "!!python/object:os.system", "{a: [", "- x", ": :", "\t"])


@st.composite
def yaml_recipes(draw) -> bytes:
    """A recipe-shaped mapping dumped as YAML, with hostile scalars and raw fragments spliced in."""
    data = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "algorithm", "typo"]), max_size=4, unique=True)):
        if section == "algorithm":
            data[section] = draw(st.sampled_from(["grpo", "ppo", "sgd"]) | JSON_VALUES)
        elif section in SECTIONS:
            keys = draw(st.lists(st.sampled_from(SECTIONS[section] + ["typo"]), max_size=3, unique=True))
            data[section] = {k: draw(JSON_VALUES) for k in keys}
        else:
            data[section] = draw(JSON_VALUES)
    try:
        text = yaml.safe_dump(data, allow_unicode=draw(st.booleans()))
    except yaml.YAMLError:  # some drawn strings have no YAML form; the spliced text below still tests the loader
        text = ""
    lines = text.splitlines()
    for _ in range(draw(st.integers(0, 3))):
        lines.insert(draw(st.integers(0, len(lines))), draw(YAML_SCALARS | ANY_TEXT | HOSTILE_SNIPPETS))
    return encode("\n".join(lines))


OVERRIDES = st.lists(
    st.tuples(st.sampled_from([f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys]
                              + ["algorithm", "env.kwargs.num_facts", "model", "x.y.z", "", "env..name"]) | ANY_TEXT,
              st.sampled_from(["=", "", "=="]), YAML_SCALARS | ANY_TEXT).map("".join),
    max_size=3,
)


def load_recipe_or_input_error(content: bytes, overrides: list[str]) -> InputError | None:
    """The recipe loads (None) or raises an InputError (returned); anything else fails the test."""
    from tmem_rl.recipes import load_recipe

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_bytes(content)
        try:
            load_recipe(path, overrides)
        except InputError as err:
            return err
    return None


# Inputs the fuzzers below once found raising another exception than InputError; each must stay fixed.
RECIPE_CRASHES = {
    "an unhashable algorithm (TypeError)": (b"algorithm: []\n", []),
    "an integer past Python's digit limit (ValueError)": (b"inner_loop:\n  epochs: " + b"7" * 5000 + b"\n", []),
    "the same in an override (ValueError)": (RECIPE.read_bytes(), ["inner_loop.epochs=" + "7" * 5000]),
    "YAML nested too deep (RecursionError)": (b"{" * 3000, []),
    "a key with a newline (a two-line message)": (RECIPE.read_bytes(), ["\x0e\n\xaa=null"]),
}
RECIPE_PATH_CRASHES = {
    "a path with a newline (a two-line message)": "\n",
    "a path with a NUL (ValueError)": "a\x00b",
    "a path with a lone surrogate (UnicodeEncodeError)": "\ud800",
}


@pytest.mark.parametrize("content, overrides", RECIPE_CRASHES.values(), ids=list(RECIPE_CRASHES))
def test_recipe_inputs_that_raise_other_exceptions(content, overrides):
    err = load_recipe_or_input_error(content, overrides)
    assert err is not None, "each of these inputs is bad"
    assert_one_line(err)


@pytest.mark.parametrize("path", RECIPE_PATH_CRASHES.values(), ids=list(RECIPE_PATH_CRASHES))
def test_recipe_paths_that_raise_other_exceptions(path):
    from tmem_rl.recipes import load_recipe

    with pytest.raises(InputError) as err:
        load_recipe(path)
    assert_one_line(err.value)


@FUZZ
@given(content=yaml_recipes() | st.binary(max_size=200).map(bytes), overrides=OVERRIDES)
def test_recipes_raise_only_input_errors(content, overrides):
    err = load_recipe_or_input_error(content, overrides)
    assert err is None or "\n" not in str(err)


@FUZZ
@given(overrides=OVERRIDES)
def test_overrides_of_a_valid_recipe_raise_only_input_errors(overrides):
    err = load_recipe_or_input_error(RECIPE.read_bytes(), overrides)
    assert err is None or "\n" not in str(err)


# ----------------------------------------------------------------------------------------------------------------
# An environment's results, checked against the contract wherever they are used
# ----------------------------------------------------------------------------------------------------------------


class Shaped(Environment):
    """A tool environment whose task, score, step or call_tool returns `bad[name]` instead of a proper value."""

    name = "shaped"
    tools = {"look": "look something up"}

    def __init__(self, **bad):
        self.bad = bad

    def __len__(self):
        return 1

    def task(self, index):
        fields = dict(task_id="shaped-0", question="q?", chunks=("a chunk",), answers=("a",))
        return Task(**{**fields, **self.bad.get("task", {})})

    def score(self, task, prediction):
        return self.bad.get("score", {"reward": 1.0, "f1": 1.0, "em": 1.0})

    def call_tool(self, state, tool, argument):
        return self.bad.get("call_tool", "found it")

    def step(self, state, action):
        return self.bad["step"] if "step" in self.bad else super().step(state, action)


ANSWER, LOOK = Action(ActionKind.ANSWER, "a"), Action(ActionKind.TOOL, "x", tool="look")


@pytest.mark.parametrize("bad, action, expected", [
    ({"task": {"task_id": 7}}, None, "task 0: field 'task_id' must be a string, got int 7"),
    ({"task": {"question": None}}, None, "task 0: field 'question' must be a string, got NoneType None"),
    ({"task": {"chunks": ["ok", 3]}}, None,
     "task 0: field 'chunks' must be a list or tuple of strings; item 1 is int 3"),
    ({"task": {"chunks": iter(["ok"])}}, None, "task 0: field 'chunks' must be a list or tuple of strings, got "
                                               "list_iterator"),
    ({"task": {"answers": b"a"}}, None, "task 0: field 'answers' must be a list or tuple of strings, got bytes b'a'"),
    ({"task": {"metadata": [1]}}, None, "task 0: field 'metadata' must be a dict, got list [1]"),
    ({"task": {"reference_pairs": ({"instruction": "q", "output": "a"},)}}, None,
     "task 0: field 'reference_pairs' must be a list or tuple of QAPair; item 0 is dict {'instruction': 'q'"),
    ({"score": {"f1": 1.0}}, ANSWER, "score of task 'shaped-0': expected a dict of metric name -> number with "
                                     "\"reward\"; got only 'f1'"),
    ({"score": {"reward": "1"}}, ANSWER, "score of task 'shaped-0': expected a dict of metric name -> number with "
                                         "\"reward\"; metric 'reward' is str '1'"),
    ({"score": {0: 1.0}}, ANSWER, "score of task 'shaped-0': expected a dict of metric name -> number with "
                                  "\"reward\"; the name int 0 is not a str"),
    ({"call_tool": 214}, LOOK, "call_tool of tool 'look' on task 'shaped-0': expected a str (the agent's "
                               "observation), got int 214"),
    ({"step": ("obs", 1.0)}, LOOK, "step of task 'shaped-0': expected a StepResult, got tuple ('obs', 1.0)"),
    ({"step": StepResult(Observation("tool", None))}, LOOK, "step of task 'shaped-0': field 'observation' must be "
                                                            "an Observation whose text is a str, got Observation"),
])
def test_an_environment_result_of_the_wrong_type_is_one_line_naming_the_field(bad, action, expected):
    env = Shaped(**bad)
    state, _ = env.reset(Shaped().task(0))
    with pytest.raises(ContractError) as err:
        env.tasks() if action is None else env.step(state, action)
    assert str(err.value).startswith(f"environment 'shaped': {expected}"), str(err.value)
    assert_one_line(err.value)


def test_proper_results_pass_the_checks_unchanged():
    env = Shaped()
    state, _ = env.reset(env.task(0))
    assert env.step(state, LOOK).observation.text == "found it"
    assert env.step(state, ANSWER).info == {"reward": 1.0, "f1": 1.0, "em": 1.0}


# ----------------------------------------------------------------------------------------------------------------
# The command line: exit status 0 or 2 and a one-line message, never a traceback
# ----------------------------------------------------------------------------------------------------------------


class Reached(Exception):
    """Raised where a command would start its real work (loading a model, training): parsing is over by then."""


def _stop(*args, **kwargs):
    raise Reached


@pytest.fixture
def nothing_slow(monkeypatch):
    from tmem_rl import recipes
    from tmem_rl.evaluation import harness

    for module, name in ((harness, "load_policy"), (harness, "load_trained_policy"), (recipes, "run_recipe")):
        monkeypatch.setattr(module, name, _stop)


def run_cli(argv: list[str]) -> tuple[int | None, str]:
    """(exit status, or None where the command got as far as its real work; stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exit:
            status = exit.code
        except Reached:
            status = None
    return status, stderr.getvalue()


def assert_clean_exit(status, stderr: str) -> None:
    assert status in (None, 0, 2), (status, stderr)
    assert "Traceback" not in stderr
    if status == 2 and "tmem-rl: error:" in stderr:
        message = stderr.split("tmem-rl: error:", 1)[1]
        assert message.count("\n") == 1, stderr  # the message is one line


# What a shell can pass: no NUL, and surrogates only as the escapes of undecodable bytes (os.fsdecode).
ARGUMENT_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20) | st.binary(
    max_size=12).filter(lambda b: b"\x00" not in b).map(os.fsdecode)
FLAG_VALUES = st.sampled_from(["", "-1", "0", "1", "2", "0.5", "1e999", "nan", "x", "[]", "{}", "{\"a\": 1}",
                               '{"num_tasks": 2}', '{"num_fact": 3}', '{"seed": "s"}', '{"data": 5}', "locomo",
                               "facts", "nowhere.json", str(FIXTURE), "heldout", "train", "all", "question",
                               "conversation", "none", "tmem", "tmem-reference", "rag", "cpu"]) | ARGUMENT_TEXT
EVAL_FLAGS = ["--env", "--data", "--env-kwargs", "--recipe", "--split", "--heldout-fraction", "--split-seed",
              "--checkpoint", "--method", "--model", "--max-questions", "--per-category", "--sample-ids",
              "--episode-unit", "--l-max", "--max-pairs", "--context-budget", "--retrieval-k", "--batch-size",
              "--seed", "--device", "--chat-template-kwargs", "--inner-lr", "--inner-epochs"]
SWITCHES = ["--greedy", "--resume"]


@st.composite
def eval_argv(draw) -> list[str]:
    argv = []
    for flag in draw(st.lists(st.sampled_from(EVAL_FLAGS + SWITCHES), max_size=5)):
        argv.append(flag)
        if flag not in SWITCHES:
            argv.append(draw(FLAG_VALUES))
    return argv


@FUZZ
@given(flags=eval_argv(), env=st.sampled_from([["--env", "facts", "--env-kwargs", '{"num_tasks": 3}'],
                                                ["--data", str(FIXTURE)], []]))
def test_eval_flags_end_in_status_0_or_2(flags, env, nothing_slow):
    with tempfile.TemporaryDirectory() as folder:
        assert_clean_exit(*run_cli(["eval", "--out", str(Path(folder) / "run"), *env, *flags]))


@pytest.mark.parametrize("flags", [
    ["--env", "facts", "--env-kwargs", '{"num_tasks": 3}', "--inner-epochs", "-1"],
    ["--env", "facts", "--env-kwargs", '{"num_tasks": 3}', "--inner-lr", "0"],
    ["--env", "facts", "--env-kwargs", '{"num_tasks": 1}', "--split", "heldout", "--heldout-fraction", "0.00001"],
])
def test_eval_flags_handled_outside_the_harness_end_in_status_2(flags, nothing_slow, tmp_path):
    assert_clean_exit(*run_cli(["eval", "--out", str(tmp_path / "run"), *flags]))


@FUZZ
@given(recipe=st.sampled_from(["nowhere.yaml", "", "-", "/", str(FIXTURE)]) | ARGUMENT_TEXT,
       overrides=st.lists(ARGUMENT_TEXT, max_size=2) | OVERRIDES,
       switches=st.lists(st.sampled_from(["--resume", "--overwrite", "--help", "--nope"]), max_size=2))
def test_train_with_a_bad_recipe_ends_in_status_2(recipe, overrides, switches, nothing_slow):
    status, stderr = run_cli(["train", recipe, *overrides, *switches])
    assert_clean_exit(status, stderr)
