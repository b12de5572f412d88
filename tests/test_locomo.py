import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tmem_rl.envs import make_env
from tmem_rl.errors import InputError
from tmem_rl.envs.locomo import (
    DATE_HINT,
    NOT_MENTIONED,
    QA_PROMPT,
    LocomoEnv,
    LocomoFormatError,
    load_locomo,
    render_stream,
)
from tmem_rl.metrics.locomo import (
    adversarial_score,
    aggregate,
    exact_match,
    multi_hop_f1,
    normalize_answer,
    score_answer,
    token_f1,
)

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"
SKIPPED = {
    "sample_id": "syn-1", "index": 6, "question": "When did Ada go on the hiking trip?", "reason": "no gold answer",
}
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo" / "locomo10_conv-26.json"


# ---- metric --------------------------------------------------------------------------------------------------


def test_normalize_answer_drops_commas_punctuation_articles_and_and():
    assert normalize_answer("The cat, and the Hat!") == "cat hat"
    assert normalize_answer("1,000 miles") == "1000 miles"
    assert normalize_answer("Dr. Seuss's book") == "dr seusss book"
    # Whole words only: "and" inside a name stays.
    assert normalize_answer("Anand and an ant") == "anand ant"


def test_token_f1_stems_and_counts_overlap():
    # Porter: running -> run, runs -> run, shoes -> shoe; 1 shared of 2 predicted, 1 gold: P=1/2, R=1.
    assert token_f1("running shoes", "runs") == pytest.approx(2 / 3)
    assert token_f1("The red car", "a red bicycle") == pytest.approx(0.5)
    assert token_f1("dog dog", "dog") == pytest.approx(2 / 3)  # a repeated token counts once against one gold
    assert token_f1("Paris", "London") == 0.0
    assert token_f1("", "London") == 0.0


def test_multi_hop_f1_is_mean_over_gold_items_of_best_prediction_item():
    assert multi_hop_f1("Pepper", "Pepper, Juniper") == pytest.approx(0.5)
    assert multi_hop_f1("pepper, juniper, rex", "Pepper, Juniper") == pytest.approx(1.0)
    # Without commas the prediction is one item: "juniper pepper" against each one-word gold scores 2/3.
    assert multi_hop_f1("Juniper and Pepper", "Pepper, Juniper") == pytest.approx(2 / 3)


def test_adversarial_score_looks_for_the_two_phrases():
    assert adversarial_score("Not mentioned in the conversation") == 1.0
    assert adversarial_score("NO INFORMATION AVAILABLE.") == 1.0
    assert adversarial_score("It is not stated") == 0.0
    assert adversarial_score("cello") == 0.0


def test_exact_match_compares_unstemmed_token_sets():
    assert exact_match("the cat sat", "sat cat") == 1.0
    assert exact_match("cat sat sat", "sat cat") == 1.0
    assert exact_match("cats", "cat") == 0.0
    assert token_f1("cats", "cat") == 1.0  # stemming applies to F1 only


def test_score_answer_per_category():
    assert score_answer("Juniper, Pepper", "Pepper, Juniper", 1) == {"f1": 1.0, "em": 1.0}
    assert score_answer("Pepper", "Pepper, Juniper", 1)["f1"] == pytest.approx(0.5)
    # Temporal with an int gold: {in, 2022} against {2022}.
    assert score_answer("In 2022", 2022, 2) == {"f1": pytest.approx(2 / 3), "em": 0.0}
    # Open-domain scores only the part before ";".
    assert score_answer("likely yes", "Likely yes; she enjoys hiking", 3) == {"f1": 1.0, "em": 1.0}
    assert score_answer("she enjoys hiking", "Likely yes; she enjoys hiking", 3) == {"f1": 0.0, "em": 0.0}
    # Single-hop uses plain F1, so a comma-free prediction is not split.
    assert score_answer("running shoes", "runs", 4) == {"f1": pytest.approx(2 / 3), "em": 0.0}
    assert score_answer("Not mentioned.", NOT_MENTIONED, 5) == {"f1": 1.0, "em": 1.0}
    assert score_answer("cello", NOT_MENTIONED, 5) == {"f1": 0.0, "em": 0.0}
    with pytest.raises(ValueError, match="category"):
        score_answer("x", "x", 6)


def test_aggregate_per_category_and_overall():
    records = [
        {"category": 1, "f1": 1.0, "em": 1.0, "seconds": 2.0},
        {"category": 1, "f1": 0.5, "em": 0.0, "seconds": 4.0},
        {"category": 2, "f1": 0.0, "em": 0.0},
        {"category": 4, "f1": 0.75, "em": 0.0},
        {"category": 5, "f1": 1.0, "em": 1.0},
    ]
    summary = aggregate(records)
    assert summary["n"] == 5
    assert summary["f1_by_category"] == {"1": 0.75, "2": 0.0, "3": None, "4": 0.75, "5": 1.0}
    assert summary["f1_1_4"] == pytest.approx(2.25 / 4)
    assert summary["f1_1_5"] == pytest.approx(3.25 / 5)
    assert summary["em"] == pytest.approx(0.4)
    assert summary["seconds_per_episode"] == pytest.approx(3.0)

    empty = aggregate([])
    assert empty["n"] == 0 and empty["f1_1_5"] is None and empty["seconds_per_episode"] is None
    assert set(empty["f1_by_category"].values()) == {None}


# ---- loader --------------------------------------------------------------------------------------------------


def test_load_fixture_counts_and_skipped():
    samples = load_locomo(FIXTURE)
    assert [s.sample_id for s in samples] == ["syn-1", "syn-2"]
    assert [len(s.questions) for s in samples] == [7, 7]
    assert samples[0].skipped == [SKIPPED]
    assert samples[1].skipped == []

    by_id = {q.question_id: q for s in samples for q in s.questions}
    assert "syn-1/q6" not in by_id and "syn-1/q7" in by_id  # ids keep the file's qa index
    assert by_id["syn-1/q4"].gold == "2022"
    assert by_id["syn-1/q5"].gold == NOT_MENTIONED and by_id["syn-1/q5"].adversarial_answer == "cello"
    assert by_id["syn-2/q4"].adversarial_answer == "Yes"  # both keys present: the adversarial one is the option
    assert by_id["syn-1/q3"].evidence == ["D2:2", "D2:4"]  # packed "D2:2; D2:4" split
    assert samples[0].speaker_a == "Ada" and samples[0].speaker_b == "Bram"


def test_sessions_sorted_by_number_empty_and_dateless_skipped(tmp_path):
    samples = load_locomo(FIXTURE)
    # syn-1 lists session_2 before session_1; syn-2 has an empty session_3 and a session_4 date with no turns.
    assert [s.index for s in samples[0].sessions] == [1, 2, 3]
    assert [s.index for s in samples[1].sessions] == [1, 2]
    assert samples[0].sessions[0].date_time == "3:15 pm on 4 March, 2021"

    raw = json.loads(FIXTURE.read_text())
    conv = raw[0]["conversation"]
    conv["session_10"], conv["session_10_date_time"] = conv.pop("session_3"), conv.pop("session_3_date_time")
    conv["session_9"], conv["session_9_date_time"] = conv.pop("session_2"), conv.pop("session_2_date_time")
    path = tmp_path / "renumbered.json"
    path.write_text(json.dumps(raw))
    assert [s.index for s in load_locomo(path)[0].sessions] == [1, 9, 10]  # not "1" < "10" < "9"


def test_render_stream_format():
    sample = load_locomo(FIXTURE)[0]
    chunks = render_stream(sample)
    assert len(chunks) == 11  # one per turn
    assert chunks[0] == (
        "DATE: 3:15 pm on 4 March, 2021\nAda: Hi Bram! I just got back from a pottery workshop in Tilbury."
    )
    assert chunks[1] == "Bram: Nice! I started learning the cello last week."
    assert chunks[2] == "Ada: Look at the vase I made there. [shares a photo of a blue clay vase on a wooden table]"
    assert chunks[4].startswith("DATE: 11:02 am on 19 April, 2021\nBram: Ada, I played")
    assert sum(c.startswith("DATE: ") for c in chunks) == 3


def test_sample_ids_filter():
    assert [s.sample_id for s in load_locomo(FIXTURE, sample_ids=["syn-2"])] == ["syn-2"]
    with pytest.raises(LocomoFormatError) as err:
        load_locomo(FIXTURE, sample_ids=["syn-9"])
    assert "syn-9" in str(err.value) and "syn-1, syn-2" in str(err.value)


def _del_conversation(raw):
    del raw[1]["conversation"]


def _bad_category(raw):
    raw[0]["qa"][0]["category"] = 7


def _float_category(raw):
    raw[0]["qa"][0]["category"] = 4.0  # equal to 4 as a dict key, but not an integer


def _qa_not_list(raw):
    raw[1]["qa"] = {"question": "x"}


def _turn_without_text(raw):
    del raw[0]["conversation"]["session_1"][1]["text"]


def _session_not_list(raw):
    raw[0]["conversation"]["session_2"] = "hello"


def _session_without_date(raw):
    del raw[1]["conversation"]["session_2_date_time"]


def _question_not_string(raw):
    raw[1]["qa"][2]["question"] = 42


def _missing_speaker(raw):
    del raw[0]["conversation"]["speaker_b"]


@pytest.mark.parametrize(
    "mutate, sample_id, field, expected",
    [
        (_del_conversation, "syn-2", "conversation", "missing field"),
        (_bad_category, "syn-1", "qa[0].category", "must be an integer in [1, 2, 3, 4, 5]"),
        (_float_category, "syn-1", "qa[0].category", "must be an integer in [1, 2, 3, 4, 5]"),
        (_qa_not_list, "syn-2", "qa", "must be a list"),
        (_turn_without_text, "syn-1", "conversation.session_1[1].text", "must be a string"),
        (_session_not_list, "syn-1", "conversation.session_2", "must be a list of turns"),
        (_session_without_date, "syn-2", "conversation.session_2_date_time", "must be a string"),
        (_question_not_string, "syn-2", "qa[2].question", "must be a string"),
        (_missing_speaker, "syn-1", "conversation.speaker_b", "missing field"),
    ],
)
def test_malformed_file_errors_name_file_sample_and_field(tmp_path, mutate, sample_id, field, expected):
    raw = json.loads(FIXTURE.read_text())
    mutate(raw)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(LocomoFormatError) as err:
        load_locomo(path)
    message = str(err.value)
    assert str(path) in message and f"sample {sample_id}" in message
    assert f"field '{field}'" in message and expected in message


def test_bad_category_message_says_what_was_expected(tmp_path):
    raw = json.loads(FIXTURE.read_text())
    _bad_category(raw)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(raw))
    expected = r"sample syn-1: field 'qa\[0\]\.category' must be an integer in \[1, 2, 3, 4, 5\], got 7"
    with pytest.raises(LocomoFormatError, match=expected):
        load_locomo(path)


def test_missing_sample_id_names_the_sample_index(tmp_path):
    raw = json.loads(FIXTURE.read_text())
    del raw[1]["sample_id"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(LocomoFormatError, match=r"sample index 1: missing field 'sample_id'") as err:
        load_locomo(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [("[{", "not valid JSON"), ('{"sample_id": "x"}', "expected a JSON list of samples, got dict")],
)
def test_not_json_or_not_a_list(tmp_path, text, expected):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(LocomoFormatError) as err:
        load_locomo(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def _set(*keys):
    """A mutation that puts a text with a lone surrogate (the JSON escape "\\ud800") at raw[keys...]."""

    def mutate(raw):
        node = raw
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = "half a character: \ud800"

    return mutate


@pytest.mark.parametrize(
    "mutate, where, field",
    [
        (_set(0, "conversation", "session_1", 1, "text"), "sample syn-1", "conversation.session_1[1].text"),
        (_set(0, "conversation", "speaker_a"), "sample syn-1", "conversation.speaker_a"),
        (_set(1, "conversation", "session_2_date_time"), "sample syn-2", "conversation.session_2_date_time"),
        (_set(1, "qa", 2, "question"), "sample syn-2", "qa[2].question"),
        (_set(0, "qa", 0, "answer"), "sample syn-1", "qa[0].answer"),
        (_set(0, "qa", 0, "evidence", 0), "sample syn-1", "qa[0].evidence[0]"),
        (_set(1, "sample_id"), "sample index 1", "sample_id"),
    ],
)
def test_a_lone_surrogate_is_rejected_naming_sample_and_field(tmp_path, mutate, where, field):
    raw = json.loads(FIXTURE.read_text())
    mutate(raw)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(raw))  # ASCII: the surrogate is the escape \ud800, as a JSON writer leaves it
    with pytest.raises(LocomoFormatError) as err:
        load_locomo(path)
    message = str(err.value)
    assert str(path) in message and f"{where}: field '{field}'" in message and "lone surrogate" in message
    message.encode("utf-8")  # the message itself can be printed


def test_a_file_that_is_not_utf8_names_the_byte_offset(tmp_path):
    data = FIXTURE.read_bytes()
    offset = data.index(b"cello")
    path = tmp_path / "latin1.json"
    path.write_bytes(data[:offset] + "violoncelle à".encode("latin-1") + data[offset + 5:])
    with pytest.raises(LocomoFormatError) as err:
        load_locomo(path)
    assert str(path) in str(err.value) and f"byte offset {offset + len('violoncelle ')}" in str(err.value)


def test_an_integer_too_long_for_python_is_an_input_error_naming_the_file(tmp_path):
    path = tmp_path / "long.json"
    path.write_text('[{"sample_id": ' + "7" * 5000 + "}]")
    with pytest.raises(LocomoFormatError, match="has more than .* digits") as err:
        load_locomo(path)
    assert str(path) in str(err.value)


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"sample_id": }\n]')
    with pytest.raises(LocomoFormatError, match=r"not valid JSON at line 2, column 17") as err:
        load_locomo(path)
    assert str(path) in str(err.value)


def test_an_empty_sample_list_is_an_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(LocomoFormatError, match="no samples") as err:
        load_locomo(path)
    assert str(path) in str(err.value)


def test_a_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(LocomoFormatError, match="cannot read the file") as err:
        load_locomo(tmp_path / "nowhere.json")
    assert "nowhere.json" in str(err.value)


def test_a_misspelt_env_setting_names_the_environment_the_key_and_the_accepted_keys():
    with pytest.raises(InputError) as err:
        make_env("locomo", data=str(FIXTURE), sample_id=["syn-1"])
    message = str(err.value)
    assert "environment 'locomo'" in message and "'sample_id'" in message
    assert "accepted: data, sample_ids, max_questions, seed, per_category" in message
    with pytest.raises(InputError, match="environment 'locomo': missing setting.*'data'"):
        make_env("locomo")
    with pytest.raises(InputError, match="sample_ids must be None or a list of strings"):
        make_env("locomo", data=str(FIXTURE), sample_ids=7)


# ---- environment ---------------------------------------------------------------------------------------------


def test_env_tasks_follow_file_order_and_share_streams():
    env = LocomoEnv(str(FIXTURE))
    assert len(env) == 14
    assert env.task(0).task_id == "syn-1/q0" and env.task(7).task_id == "syn-2/q0"
    first = env.task(0)
    assert first.question == "What instrument did Bram start learning?"
    assert first.answers == ("cello",)
    assert first.metadata == {
        "sample_id": "syn-1", "question_id": "syn-1/q0", "category": 4, "evidence": ["D1:2"], "options": None,
    }
    assert env.task(1).chunks is first.chunks  # rendered once per conversation
    assert first.chunks == tuple(render_stream(env.samples[0]))
    assert env.skipped == [SKIPPED]
    grouped = env.questions_by_sample()
    assert list(grouped) == ["syn-1", "syn-2"]
    assert [t.task_id for t in grouped["syn-2"]] == [f"syn-2/q{i}" for i in range(7)]
    with pytest.raises(IndexError):
        env.task(14)


def test_env_max_questions_and_sample_filter():
    assert [t.task_id for t in LocomoEnv(str(FIXTURE), max_questions=3).tasks()] == ["syn-1/q0", "syn-1/q1", "syn-1/q2"]
    assert len(LocomoEnv(str(FIXTURE), max_questions=0)) == 0
    only = LocomoEnv(str(FIXTURE), sample_ids=["syn-2"])
    assert {t.metadata["sample_id"] for t in only.tasks()} == {"syn-2"}
    with pytest.raises(ValueError, match="max_questions"):
        LocomoEnv(str(FIXTURE), max_questions=-1)
    assert len(make_env("locomo", data=str(FIXTURE))) == 14


def _adversarial(env):
    return [t for t in env.tasks() if t.metadata["category"] == 5]


def test_adversarial_options_are_seeded_per_question():
    env = LocomoEnv(str(FIXTURE))
    tasks = _adversarial(env)
    assert len(tasks) == 3
    for task in tasks:
        assert NOT_MENTIONED in task.metadata["options"].values()
    options = {t.task_id: t.metadata["options"] for t in tasks}
    assert options == {t.task_id: t.metadata["options"] for t in _adversarial(LocomoEnv(str(FIXTURE)))}
    # Loading fewer samples does not shift another sample's option order.
    only = {t.task_id: t.metadata["options"] for t in _adversarial(LocomoEnv(str(FIXTURE), sample_ids=["syn-2"]))}
    assert only == {k: v for k, v in options.items() if k.startswith("syn-2/")}
    orders = {
        tuple(t.metadata["options"]["a"] == NOT_MENTIONED for t in _adversarial(LocomoEnv(str(FIXTURE), seed=s)))
        for s in range(20)
    }
    assert len(orders) > 1
    # The order is drawn per question, so questions of one run do not all share it.
    assert any(len(set(order)) > 1 for order in orders)


def test_score_maps_option_letters():
    env = LocomoEnv(str(FIXTURE))
    task = next(t for t in _adversarial(env) if t.task_id == "syn-1/q5")
    right = "a" if task.metadata["options"]["a"] == NOT_MENTIONED else "b"
    wrong = "b" if right == "a" else "a"
    assert env.score(task, f"({right})") == {"reward": 1.0, "f1": 1.0, "em": 1.0}
    assert env.score(task, f" {right.upper()} ")["reward"] == 1.0
    assert env.score(task, f"({wrong})")["reward"] == 0.0
    assert env.score(task, wrong)["reward"] == 0.0
    assert env.score(task, "cello")["reward"] == 0.0
    assert env.score(task, "Not mentioned in the conversation.")["reward"] == 1.0

    multi = env.task(1)  # gold "Pepper, Juniper"
    assert env.score(multi, "Juniper")["reward"] == pytest.approx(0.5)
    # A letter means nothing outside category 5.
    assert env.score(env.task(0), "a")["reward"] == 0.0


def test_answer_prompt_official_shapes():
    env = LocomoEnv(str(FIXTURE))
    single = env.task(0)
    assert env.answer_prompt(single.question, "CTX", single) == "CTX\n\n" + QA_PROMPT.format(single.question)
    assert env.answer_prompt(single.question, "  ", single) == QA_PROMPT.format(single.question)
    assert env.answer_prompt("Who?", "CTX") == "CTX\n\n" + QA_PROMPT.format("Who?")

    temporal = env.task(2)
    assert temporal.metadata["category"] == 2
    prompt = env.answer_prompt(temporal.question, "CTX", temporal)
    assert f"Question: {temporal.question}{DATE_HINT} Short answer:" in prompt
    assert DATE_HINT not in env.answer_prompt(temporal.question, "CTX")  # no task: the inner loop's bare shape

    adversarial = next(t for t in _adversarial(env) if t.task_id == "syn-1/q5")
    options = adversarial.metadata["options"]
    prompt = env.answer_prompt(adversarial.question, "CTX", adversarial)
    assert prompt.startswith("CTX\n\nBased on the above context, answer the following question.\n\n")
    assert (
        f"Question: {adversarial.question} Select the correct answer: (a) {options['a']} (b) {options['b']}. "
        " Short answer:"
    ) in prompt


# ---- the real sample, when this checkout has it -----------------------------------------------------------------


@pytest.mark.skipif(not REAL.exists(), reason=f"LoCoMo sample not present at {REAL}")
def test_real_conversation_loads_completely():
    raw = json.loads(REAL.read_text())
    env = LocomoEnv(str(REAL))
    assert len(env) == 199 == len(raw[0]["qa"])
    assert env.skipped == []
    loaded = Counter(t.metadata["category"] for t in env.tasks())
    assert loaded == Counter(q["category"] for q in raw[0]["qa"])
    assert set(loaded) == {1, 2, 3, 4, 5}

    conv = raw[0]["conversation"]
    turn_lists = [v for k, v in conv.items() if k.startswith("session_") and isinstance(v, list) and v]
    chunks = env.task(0).chunks
    assert len(chunks) == sum(len(v) for v in turn_lists)
    assert sum(c.startswith("DATE: ") for c in chunks) == len(turn_lists)
    assert all(isinstance(t.answers[0], str) for t in env.tasks())
    # One entry in the file packs two ids ("D8:6; D9:17"); every id comes out on its own.
    assert all(re.fullmatch(r"D\d+:\d+", e) for t in env.tasks() for e in t.metadata["evidence"])



def test_per_category_keeps_the_first_questions_of_each_category():
    env = LocomoEnv(FIXTURE, per_category=1)
    categories = [t.metadata["category"] for t in env.tasks()]
    assert sorted(categories) == sorted(set(categories)) == [1, 2, 3, 4, 5]
    everything = LocomoEnv(FIXTURE).tasks()
    first_of = {}
    for t in everything:
        first_of.setdefault(t.metadata["category"], t.task_id)
    assert {t.task_id for t in env.tasks()} == set(first_of.values())
