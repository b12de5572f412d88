"""The context-learning environment: seeded documents, rules that yield the gold answer, rubric checks, and an
evaluation run on the tiny model."""

import json
from decimal import ROUND_HALF_UP, Decimal

import pytest

from tmem_rl.envs import Task, make_env
from tmem_rl.envs.context_learning import ContextLearningEnv, check_rubric, extract_numbers
from tmem_rl.episode import EpisodeConfig
from tmem_rl.errors import InputError
from tmem_rl.extraction import fold, reference_supervision
from tmem_rl.memory import FastWeightConfig

SMALL = ContextLearningEnv.MIN_DOC_WORDS


def small_env(**kwargs) -> ContextLearningEnv:
    return ContextLearningEnv(**{"num_tasks": 8, "doc_words": SMALL, **kwargs})


def first_of(kind: str, env: ContextLearningEnv | None = None):
    env = env or small_env(num_tasks=4)
    return next(t for t in env.tasks() if t.metadata["category"] == kind)


# ---- the rules, recomputed here from the generated values ----------------------------------------------------

MEANINGS = {  # the notation's meanings, written out again
    "scale_add": lambda a, b, k: k * a + b,
    "mul_sub": lambda a, b, k: a * b - k,
    "add_scale": lambda a, b, k: (a + b) * k,
    "square_sub": lambda a, b, k: a * a - b,
    "max_add": lambda a, b, k: max(a, b) + k,
    "diff_scale": lambda a, b, k: abs(a - b) * k,
    "add_mul": lambda a, b, k: a + k * b,
}


def expected_answer(kind: str, rules: dict, s: dict):
    if kind == "product":
        price = Decimal(rules["tiers"][s["tier"]])
        base = s["units"] * s["months"] * price
        total = base + base * rules["surcharges"][s["zone"]] / Decimal(100)
        if s["express"]:
            total += s["units"] * Decimal(rules["express_fee"])
        d = rules["discount"]
        if s["card"] and s["units"] >= d["min_units"]:
            total = total * (100 - d["percent"]) / Decimal(100)
        return float(total.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
    if kind == "notation":
        x, left, y, right, z = s["expression"]

        def op(sym, a, b):
            return MEANINGS[rules["operators"][sym]["meaning"]](a, b, rules["operators"][sym]["k"])

        return op(left, x, op(right, y, z)) if rules["first"] == right else op(right, op(left, x, y), z)
    if kind == "units":
        a, b, c = rules["factors"]
        if s["material"] == rules["special"]["material"]:
            a = rules["special"]["factor"]
        p, q, r = s["amounts"]
        return (p * a * b + q * b + r) * c
    forms = []
    for stage in rules["stages"]:
        cond = stage["condition"]
        if cond is None:
            met = True
        elif cond["attribute"] == "weight":
            met = s["weight"] > cond["threshold"]
        elif cond["attribute"] == "age":
            met = s["age"] < cond["threshold"]
        else:
            met = s[cond["attribute"]]
        form = stage["form"] if met else stage["otherwise"]
        forms += [form] if form else []
    return forms


def stated(task, text: str, chunks: list[int]) -> bool:
    return any(text in task.chunks[i] for i in chunks)


def check_rules_in_stream(task) -> None:
    """Every rule value the question needs is stated in one of the task's rule paragraphs."""
    kind, rules, s = task.metadata["category"], task.metadata["rules"], task.metadata["situation"]
    where = task.metadata["rule_chunks"]
    name = task.metadata["subject"]
    assert all(fold(name) in fold(task.chunks[i]) for i in where)
    if kind == "product":
        price = f"${Decimal(rules['tiers'][s['tier']]):,.2f}"
        assert any(s["tier"] in task.chunks[i] and price in task.chunks[i] for i in where)
        pct = rules["surcharges"][s["zone"]]
        assert stated(task, f"{s['zone']} zone carry " + (f"a surcharge of {pct}%" if pct else "no surcharge"), where)
        assert stated(task, f"${Decimal(rules['express_fee']):,.2f} per unit", where)
        d = rules["discount"]
        assert stated(task, f"{d['card']} card who rent at least {d['min_units']} units", where)
        assert stated(task, f"get {d['percent']}% off", where) and stated(task, "is taken last", where)
    elif kind == "notation":
        for sym in (s["expression"][1], s["expression"][3]):
            assert stated(task, f"a {sym} b means", where)
        assert stated(task, f"{rules['first']} is always worked out first", where)
    elif kind == "units":
        big, mid, small, tiny = rules["units"]
        a, b, c = rules["factors"]
        for text in (f"one {big} is {a} {mid}s", f"{mid} is made up of {b} {small}s", f"{small} equals {c} {tiny}s",
                     f"a {big} is reckoned as {rules['special']['factor']} {mid}s"):
            assert stated(task, text, where), text
    else:
        for stage in rules["stages"]:
            forms = [stage["form"]] + ([stage["otherwise"]] if stage["otherwise"] else [])
            assert any(all(f"form {f}" in task.chunks[i] for f in forms) for i in where)
        assert stated(task, "completed in order", where)


# ---- generation -------------------------------------------------------------------------------------------------


def test_same_seed_same_documents_different_seed_different():
    a = small_env(seed=3).tasks()
    assert a == small_env(seed=3).tasks()
    b = small_env(seed=4).tasks()
    assert all(x.chunks != y.chunks and x.question != y.question for x, y in zip(a, b))
    assert a[0].task_id == "context_learning-3-0"


def test_each_task_independent_of_the_others():
    env = small_env(num_tasks=12, seed=1)
    forward = [env.task(i) for i in range(12)]
    fresh = small_env(num_tasks=12, seed=1)
    assert fresh.task(9) == forward[9]  # nothing generated before it
    assert [fresh.task(i) for i in reversed(range(12))][::-1] == forward
    assert small_env(num_tasks=500, seed=1).task(9) == forward[9]  # nor on how many tasks there are
    assert len({t.chunks for t in forward}) == 12


def test_kinds_in_turn_and_a_subset():
    env = small_env()
    assert [t.metadata["category"] for t in env.tasks()] == list(ContextLearningEnv.KINDS) * 2
    assert {t.metadata["category"] for t in small_env(kinds=["units", "procedure"]).tasks()} == {"units",
                                                                                                 "procedure"}


def test_rules_do_not_depend_on_the_document_size():
    short, long = small_env(num_tasks=4).tasks(), small_env(num_tasks=4, doc_words=3000).tasks()
    for s, t in zip(short, long):
        assert (s.question, s.answers, s.metadata["rubrics"]) == (t.question, t.answers, t.metadata["rubrics"])
        assert t.metadata["num_words"] >= 3000 > s.metadata["num_words"]


def condition_met(kind: str, rules: dict, s: dict) -> bool:
    """Whether the task's condition (the card discount, the material exception) applies to the question."""
    if kind == "product":
        return s["card"] and s["units"] >= rules["discount"]["min_units"]
    return s["material"] == rules["special"]["material"]


@pytest.mark.parametrize("kind", ["product", "units"])
def test_questions_meet_and_miss_the_conditions(kind):
    tasks = small_env(num_tasks=40, kinds=[kind], seed=2).tasks()
    assert {condition_met(kind, t.metadata["rules"], t.metadata["situation"]) for t in tasks} == {True, False}


@pytest.mark.parametrize("kind", ContextLearningEnv.KINDS)
def test_gold_answer_follows_from_the_rules_in_the_stream(kind):
    for task in small_env(num_tasks=40, kinds=[kind], seed=2).tasks():
        meta = task.metadata
        check_rules_in_stream(task)
        gold = expected_answer(kind, meta["rules"], meta["situation"])
        rubrics = meta["rubrics"]
        if kind == "procedure":
            assert task.answers == (", ".join(gold),)
            assert [r["text"] for r in rubrics if r["kind"] == "contains"] == gold
            assert [r["items"] for r in rubrics if r["kind"] == "order"] == ([gold] if len(gold) > 1 else [])
            sister = expected_answer(kind, meta["distractor_rules"], meta["situation"])
            absent = [r["text"] for r in rubrics if r["kind"] == "absent"]
            assert absent[0] in sister and not set(absent) & set(gold)
        else:
            number = rubrics[0]
            assert number["kind"] == "number" and number["value"] == pytest.approx(gold, abs=1e-9)
            assert extract_numbers(task.answers[0]) == [pytest.approx(gold)]
            sister = expected_answer(kind, meta["distractor_rules"], meta["situation"])
            assert rubrics[1] == {**rubrics[1], "kind": "absent", "value": pytest.approx(sister)}
            assert all(abs(r["value"] - gold) > 0.01 for r in rubrics[1:])
        json.dumps(meta)  # metadata travels into records and summaries


def test_distractors_present_with_a_look_alike_name():
    for task in small_env(num_tasks=8).tasks():
        meta = task.metadata
        subject, other = meta["subject"], meta["distractor"]
        assert subject != other and subject.split()[1][:3] == other.split()[1][:3]  # "the Vaskortel", "the Vaskormir"
        assert len(meta["distractor_chunks"]) >= 3
        assert all(fold(other) in fold(task.chunks[i]) for i in meta["distractor_chunks"])
        assert not set(meta["rule_chunks"]) & set(meta["distractor_chunks"])
        assert meta["distractor_rules"] != meta["rules"]


def test_rules_are_scattered_one_chunk_per_paragraph():
    spans = []
    for task in ContextLearningEnv(num_tasks=8, doc_words=4000).tasks():
        where, n = task.metadata["rule_chunks"], len(task.chunks)
        assert len(set(where)) == len(where) and 0 not in where  # the intro opens every document
        assert all("\n" not in c for c in task.chunks)
        spans.append((max(where) - min(where)) / n)
    assert sum(spans) / len(spans) > 0.4


def test_default_documents_exceed_the_default_budget():
    from tmem_rl.models import FIXTURE_TOKENIZER, load_tokenizer

    tokenizer = load_tokenizer(FIXTURE_TOKENIZER)  # the default model's (SmolLM2) tokenizer
    env = ContextLearningEnv(num_tasks=4)
    assert env.default_l_max == 12288
    for task in env.tasks():
        tokens = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in task.chunks)
        assert tokens > 1.05 * env.default_l_max, (task.metadata["category"], tokens)
        assert len(task.chunks) > 100


def test_smallest_documents_hold_their_rules():
    for task in ContextLearningEnv(num_tasks=200, doc_words=SMALL).tasks():
        meta = task.metadata
        required = [0, *meta["rule_chunks"], *meta["distractor_chunks"]]
        assert sum(len(task.chunks[i].split()) for i in required) <= SMALL
        assert SMALL <= meta["num_words"] < SMALL + 150


def test_reference_pairs_are_grounded_in_the_rule_paragraphs():
    for task in small_env().tasks():
        rules = "\n".join(task.chunks[i] for i in task.metadata["rule_chunks"])
        assert len(task.reference_pairs) >= 4
        assert all(fold(p.output) in fold(rules) for p in task.reference_pairs)
        window = task.chunks[task.metadata["rule_chunks"][0]]
        assert reference_supervision(task.reference_pairs, window, [], 8)  # what a reference extraction absorbs


# ---- scoring --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, numbers", [
    ("$1,234.50", [1234.5]),
    ("The total is 42.50.", [42.5]),
    ("-12 and \u22123", [-12.0, -3.0]),
    ("form K-7, then 2-3 days", [7.0, 2.0, 3.0]),
    ("12,15 and 1,000,000", [12.0, 15.0, 1_000_000.0]),
    ("US$99 or \u20ac 5", [99.0, 5.0]),
    ("no numbers here", []),
])
def test_extract_numbers(text, numbers):
    assert extract_numbers(text) == numbers


@pytest.mark.parametrize("rubric, prediction, passed", [
    ({"kind": "number", "value": 1234.5, "tolerance": 0.01}, "$1,234.50", True),
    ({"kind": "number", "value": 1234.5, "tolerance": 0.01}, "Total: 1234.49", True),
    ({"kind": "number", "value": 1234.5, "tolerance": 0.01}, "1234.4", False),
    ({"kind": "number", "value": 38, "tolerance": 0.0}, "7 @ 6 # 6 = 38", True),  # the last number is the answer
    ({"kind": "number", "value": 38, "tolerance": 0.0}, "38, or maybe 42", False),
    ({"kind": "number", "value": 38, "tolerance": 0.0}, "", False),
    ({"kind": "contains", "text": "form K-7"}, "File form K-7 first.", True),
    ({"kind": "contains", "text": "KD-42"}, "kd 42", True),
    ({"kind": "contains", "text": "KD-42"}, "KD-421", False),
    ({"kind": "contains", "text": "KD-42"}, "AKD-42", False),
    ({"kind": "order", "items": ["A-1", "B-2"]}, "A-1, B-2", True),
    ({"kind": "order", "items": ["A-1", "B-2"]}, "B-2, A-1", False),
    ({"kind": "order", "items": ["A-1", "B-2"]}, "A-1", False),
    ({"kind": "absent", "text": "K-7"}, "K-8", True),
    ({"kind": "absent", "text": "K-7"}, "K-8, K-7", False),
    ({"kind": "absent", "text": "K-7"}, "  ", False),  # an empty answer passes no rubric
    ({"kind": "absent", "text": "K-7"}, "I don't know", False),  # nor one that names no code
    ({"kind": "absent", "text": "KD-42"}, "form ab 12", True),  # a code of the same shape
    ({"kind": "absent", "text": "KD-42"}, "form K-7", False),  # not a code of this task's shape
    ({"kind": "absent", "value": 175.0, "tolerance": 0.01}, "$376.00", True),
    ({"kind": "absent", "value": 175.0, "tolerance": 0.01}, "376 or 175.00", False),
    # The answer is the last number, as "number" reads it: a subtotal on the way is no distractor.
    ({"kind": "absent", "value": 175.0, "tolerance": 0.01}, "175.00 plus 201 makes 376", True),
    ({"kind": "absent", "value": 175.0, "tolerance": 0.01}, "I do not know", False),
    ({"kind": "absent", "value": 175.0, "tolerance": 0.01}, "", False),
])
def test_rubric_checks(rubric, prediction, passed):
    assert check_rubric(rubric, prediction) is passed


def test_unknown_rubric_kind_is_named():
    with pytest.raises(ValueError, match="unknown rubric kind 'regex'"):
        check_rubric({"kind": "regex"}, "x")


@pytest.mark.parametrize("kind", ["product", "notation", "units"])
def test_score_number_tasks(kind):
    env = small_env()
    task = first_of(kind, env)
    gold, rubrics = task.answers[0], task.metadata["rubrics"]
    right = env.score(task, gold)
    assert right == {"reward": 1.0, "f1": 1.0, "em": 1.0, "rubric_all": 1.0, "rubric_fraction": 1.0}
    assert env.score(task, f"The answer is {gold}")["rubric_all"] == 1.0
    wrong = env.score(task, str(rubrics[0]["value"] + 1))  # a wrong number: only the "absent" rubrics pass
    assert (wrong["reward"], wrong["rubric_all"], wrong["rubric_fraction"]) == (0.0, 0.0, pytest.approx(2 / 3))
    sister = env.score(task, str(rubrics[1]["value"]))  # the distractor's answer fails "number" and its "absent"
    assert (sister["reward"], sister["rubric_fraction"]) == (0.0, pytest.approx(1 / 3))
    for declined in ("", "I don't know"):
        assert env.score(task, declined)["reward"] == env.score(task, declined)["rubric_fraction"] == 0.0


def hand_task(rubrics: list[dict], answer: str) -> Task:
    return Task(task_id="t", question="q", chunks=(), answers=(answer,), metadata={"rubrics": rubrics})


@pytest.mark.parametrize("prediction, reward, fraction", [
    ("376", 1.0, 1.0),
    ("The subtotal is $175.00; with the surcharge the total is $376.00.", 1.0, 1.0),  # worked, ends on the answer
    ("377", 0.0, 2 / 3),  # a wrong number avoids both distractors: the fraction's floor
    ("175", 0.0, 1 / 3),
    ("412.50", 0.0, 1 / 3),
    ("I don't know", 0.0, 0.0),
    ("", 0.0, 0.0),
])
def test_reward_is_all_rubrics_number_task(prediction, reward, fraction):
    task = hand_task([{"kind": "number", "value": 376.0, "tolerance": 0.01},
                      {"kind": "absent", "value": 175.0, "tolerance": 0.01},
                      {"kind": "absent", "value": 412.5, "tolerance": 0.01}], "376")
    scores = small_env().score(task, prediction)
    assert (scores["reward"], scores["rubric_all"], scores["rubric_fraction"]) == (reward, reward,
                                                                                  pytest.approx(fraction))


@pytest.mark.parametrize("prediction, reward, fraction", [
    ("AB-12, CD-34", 1.0, 1.0),
    ("form AB 12, then form CD 34", 1.0, 1.0),
    ("CD-34, AB-12", 0.0, 4 / 5),  # out of order
    ("AB-12, CD-34, EF-56", 0.0, 4 / 5),  # a distractor's form too
    ("XY-99", 0.0, 2 / 5),  # a code, but not the right ones: only the "absent" rubrics pass
    ("I don't know", 0.0, 0.0),
    ("", 0.0, 0.0),
])
def test_reward_is_all_rubrics_procedure_task(prediction, reward, fraction):
    task = hand_task([{"kind": "contains", "text": "AB-12"}, {"kind": "contains", "text": "CD-34"},
                      {"kind": "order", "items": ["AB-12", "CD-34"]}, {"kind": "absent", "text": "EF-56"},
                      {"kind": "absent", "text": "GH-78"}], "AB-12, CD-34")
    scores = small_env().score(task, prediction)
    assert (scores["reward"], scores["rubric_all"], scores["rubric_fraction"]) == (reward, reward,
                                                                                  pytest.approx(fraction))


def test_score_procedure_task():
    env = small_env(num_tasks=40, kinds=["procedure"])
    task = next(t for t in env.tasks() if t.answers[0].count(",") >= 2)  # three forms or more
    rubrics = task.metadata["rubrics"]
    gold = [r["text"] for r in rubrics if r["kind"] == "contains"]
    assert env.score(task, ", ".join(gold))["rubric_all"] == 1.0
    assert env.score(task, " then ".join(g.replace("-", " ") for g in gold))["rubric_all"] == 1.0
    shuffled = env.score(task, ", ".join(reversed(gold)))
    assert shuffled["rubric_all"] == 0.0 and shuffled["rubric_fraction"] == pytest.approx(1 - 1 / len(rubrics))
    absent = [r["text"] for r in rubrics if r["kind"] == "absent"]
    distracted = env.score(task, ", ".join([*gold, absent[0]]))
    assert distracted["rubric_fraction"] == pytest.approx(1 - 1 / len(rubrics)) and distracted["reward"] == 0.0
    assert env.score(task, "I don't know")["rubric_fraction"] == 0.0


def test_summarize_reports_rubrics_overall_and_per_kind():
    records = [
        {"category": "units", "rubric_all": 1.0, "rubric_fraction": 1.0},
        {"category": "units", "rubric_all": 0.0, "rubric_fraction": 0.5},
        {"category": "procedure", "rubric_all": 0.0, "rubric_fraction": 0.25},
        {"category": "procedure", "f1": 0.0},  # a record without rubric scores is not counted
    ]
    summary = small_env().summarize(records)
    assert summary == {
        "rubric_all": pytest.approx(1 / 3), "rubric_all_by_category": {"procedure": 0.0, "units": 0.5},
        "rubric_fraction": pytest.approx(1.75 / 3),
        "rubric_fraction_by_category": {"procedure": 0.25, "units": 0.75},
    }


def test_answer_prompt_asks_for_a_checkable_answer():
    env = small_env()
    task = first_of("procedure", env)
    prompt = env.answer_prompt(task.question, "some text", task)
    assert prompt.startswith("Text:\nsome text") and prompt.endswith("separated by commas.")
    assert env.answer_prompt("Q?", "") == "Question: Q?"  # an extracted pair's question: the plain shape


@pytest.mark.parametrize("kwargs, named", [
    ({"num_tasks": 0}, "num_tasks"),
    ({"num_tasks": "3"}, "num_tasks"),
    ({"doc_words": 10}, "doc_words"),
    ({"doc_words": 2500.0}, "doc_words"),
    ({"kinds": []}, "kinds"),
    ({"kinds": "units"}, "kinds"),
    ({"kinds": ["units", "recipes"]}, "'recipes'"),
    ({"kinds": ["units", "units"]}, "twice"),
    ({"seed": "zero"}, "seed"),
])
def test_bad_settings_raise_one_line(kwargs, named):
    with pytest.raises(InputError, match=named) as err:
        ContextLearningEnv(**kwargs)
    assert "\n" not in str(err.value) and "context_learning env" in str(err.value)


def test_task_index_out_of_range():
    with pytest.raises(IndexError):
        small_env(num_tasks=2).task(2)


# ---- end to end -------------------------------------------------------------------------------------------------


def test_eval_on_the_tiny_model_reports_rubrics_per_kind(tmp_path):
    from tmem_rl.evaluation.harness import EvalConfig, read_records, run_eval
    from tmem_rl.evaluation.methods import MethodSettings

    kinds = ["product", "procedure"]
    env_kwargs = {"num_tasks": 2, "doc_words": SMALL, "kinds": kinds}  # ~1.4k tokens a stream
    summary = run_eval(EvalConfig(
        out=str(tmp_path), env="context_learning", env_kwargs=env_kwargs, model="tiny", methods=["none", "tmem"],
        episode=EpisodeConfig(l_max=600, max_answer_tokens=6, max_extraction_tokens=8, extraction_retries=0),
        device="cpu", fast_weights=FastWeightConfig(epochs=1), methods_settings=MethodSettings(answer_batch_size=2),
    ))
    records = read_records(tmp_path / "results.jsonl")
    assert len(records) == 4
    for r in records:
        assert r["category"] in kinds
        assert 0.0 <= r["rubric_fraction"] <= 1.0 and r["rubric_all"] in (0.0, 1.0)
        assert r["reward"] == r["rubric_all"]
    assert all(r["extractions"] for r in records if r["method"] == "tmem")  # the streams run past L_max
    for row in ("none", "tmem"):
        s = summary[row]
        assert set(s["rubric_all_by_category"]) == set(s["rubric_fraction_by_category"]) == set(kinds)
        assert 0.0 <= s["rubric_fraction"] <= 1.0
    assert json.loads((tmp_path / "summary.json").read_text())["tmem"]["rubric_all"] == summary["tmem"]["rubric_all"]
    header = (tmp_path / "summary.md").read_text().splitlines()[0]
    assert "| rubric_all |" in header and "| rubric_fraction |" in header


def test_cli_eval_runs_the_environment(tmp_path, capsys):
    from tmem_rl.cli import main

    common = ["eval", "--env", "context_learning", "--model", "tiny", "--method", "none", "--max-questions", "1",
              "--greedy", "--device", "cpu", "--l-max", "256"]
    kwargs = json.dumps({"num_tasks": 2, "doc_words": SMALL, "kinds": ["notation"]})
    assert main([*common, "--env-kwargs", kwargs, "--out", str(tmp_path / "run")]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert record["category"] == "notation" and "rubric_all" in record
    capsys.readouterr()  # the progress bars
    bad = json.dumps({"kinds": ["recipes"]})
    assert main([*common, "--env-kwargs", bad, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kinds" in err[0] and "recipes" in err[0]


def test_make_env_builds_it():
    env = make_env("context_learning", num_tasks=3, doc_words=SMALL)
    assert isinstance(env, ContextLearningEnv) and len(env) == 3
