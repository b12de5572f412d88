import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tmem_rl.cli import main
from tmem_rl.envs import make_env
from tmem_rl.envs.longmemeval import (
    QA_PROMPT,
    QUESTION_TYPES,
    JudgeError,
    LongMemEvalEnv,
    LongMemEvalFormatError,
    abstains,
    judge_prompt,
    load_longmemeval,
)
from tmem_rl.episode import EpisodeConfig
from tmem_rl.errors import InputError
from tmem_rl.evaluation.harness import EvalConfig, read_records, run_eval
from tmem_rl.memory import FastWeightConfig

FIXTURE = Path(__file__).parent / "fixtures" / "longmemeval_s_tiny.json"
IDS = ["lme-ssu-01", "lme-ssa-01", "lme-pref-01", "lme-multi-01", "lme-temp-01", "lme-ku-01", "lme-ssu-02_abs"]


def env(**kwargs) -> LongMemEvalEnv:
    return LongMemEvalEnv(str(FIXTURE), **kwargs)


def task(environment: LongMemEvalEnv, question_id: str):
    return next(t for t in environment.tasks() if t.task_id == question_id)


# ---- loading and the stream ----------------------------------------------------------------------------------


def test_the_fixture_loads_one_task_per_item_in_file_order():
    e = env()
    assert [t.task_id for t in e.tasks()] == IDS
    assert {t.metadata["category"] for t in e.tasks()} == set(QUESTION_TYPES)
    assert e.skipped == []
    first = e.task(0)
    assert first.answers == ("Border Collie",)
    assert first.metadata == {
        "sample_id": "lme-ssu-01", "question_id": "lme-ssu-01", "category": "single-session-user",
        "abstention": False, "answer_session_ids": ["ssu-01-a"], "question_date": "2023/06/02 (Fri) 18:05",
        "question": "What breed is the puppy I adopted?",
    }
    assert first.reference_pairs == ()
    assert task(e, "lme-multi-01").answers == ("3",)  # an int in the file
    abstention = task(e, "lme-ssu-02_abs")
    assert abstention.metadata["abstention"] is True and abstention.metadata["answer_session_ids"] == []
    assert e.questions_by_sample() == {t.task_id: [t] for t in e.tasks()}
    with pytest.raises(IndexError):
        e.task(7)


def test_the_stream_is_sessions_by_date_each_opened_by_its_date():
    # The file lists the sessions 05/28, 05/20, 05/24.
    assert env().task(0).chunks == (
        "Session date: 2023/05/20 (Sat) 14:30\nuser: Can you suggest a quick weeknight pasta recipe?",
        "assistant: Try garlic butter linguine with spinach; it takes about fifteen minutes.",
        "Session date: 2023/05/24 (Wed) 20:02\nuser: What is a good stretching routine after running?",
        "assistant: Hold calf, hamstring and quad stretches for thirty seconds each.",
        "user: Thanks, I will try that tomorrow.",
        "Session date: 2023/05/28 (Sun) 09:14\nuser: I finally adopted a puppy yesterday, a Border Collie named "
        "Pixel!",
        "assistant: Congratulations! Plan plenty of exercise and puzzle toys for Pixel.",
    )
    for t in env().tasks():
        opened = [c.split("\n")[0] for c in t.chunks if c.startswith("Session date: ")]
        assert opened == sorted(opened), t.task_id  # this fixture's dates sort as text too
        assert not any("has_answer" in c for c in t.chunks)


def test_sessions_of_the_same_date_keep_the_file_order():
    chunks = task(env(), "lme-temp-01").chunks
    assert chunks[0] == "Session date: 2023/07/10 (Mon) 09:45\nuser: I had my dentist appointment this morning, one " \
                        "small filling."
    assert chunks[2] == "Session date: 2023/07/10 (Mon) 09:45\nuser: Also, what should I eat after a filling?"
    assert chunks[4].startswith("Session date: 2023/07/22 (Sat) 17:00\n")


def test_dates_sort_by_time_not_as_text(tmp_path):
    raw = json.loads(FIXTURE.read_text())
    raw[5]["haystack_dates"] = ["2023/10/4 (Wed) 9:05", "2023/10/14 (Sat) 18:30"]  # as text, "10/4" > "10/14"
    path = tmp_path / "dates.json"
    path.write_text(json.dumps(raw))
    chunks = LongMemEvalEnv(str(path)).task(5).chunks
    assert chunks[0].startswith("Session date: 2023/10/4 (Wed) 9:05\nuser: I moved my bike")


def test_the_question_carries_its_date_when_read_and_when_answered():
    e = env()
    t = e.task(0)
    assert t.question == "What breed is the puppy I adopted? (asked on 2023/06/02 (Fri) 18:05)"
    _, observation = e.reset(t)
    assert observation.kind == "question" and observation.text == t.question
    assert e.answer_prompt(t.question, "CTX", t) == "CTX\n\n" + QA_PROMPT.format(t.question)
    assert "Question: What breed is the puppy I adopted? (asked on 2023/06/02 (Fri) 18:05) Short answer:" in \
        e.answer_prompt(t.question, "CTX", t)
    assert e.answer_prompt(t.question, "  ", t) == QA_PROMPT.format(t.question)
    # An extracted pair's question is asked in the same shape, without a date of its own.
    assert e.answer_prompt("Who?", "") == QA_PROMPT.format("Who?")


# ---- scoring -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "question_id, prediction, f1, em",
    [
        ("lme-ssu-01", "a Border Collie.", 1.0, 1.0),  # articles and punctuation dropped
        # {pixel, is, border, collie, puppy} against {border, collie}: P = 2/5, R = 1.
        ("lme-ssu-01", "Pixel is a Border Collie puppy", 4 / 7, 0.0),
        ("lme-ssu-01", "Collie", 2 / 3, 0.0),
        ("lme-ssu-01", "Labrador", 0.0, 0.0),
        ("lme-multi-01", "3", 1.0, 1.0),
        ("lme-multi-01", "3 games", 2 / 3, 0.0),
        ("lme-multi-01", "three", 0.0, 0.0),
        ("lme-ku-01", "The garage", 2 / 3, 0.0),  # gold "in the garage" -> {in, garage}
        ("lme-ssu-01", "I don't know", 0.0, 0.0),  # declining an answerable question earns nothing
        ("lme-ssu-02_abs", "I don't know.", 1.0, 1.0),
        ("lme-ssu-02_abs", "You never mentioned a cat.", 1.0, 1.0),
        ("lme-ssu-02_abs", "Persian", 0.0, 0.0),
        # The gold explanation's words earn nothing either: only declining counts.
        ("lme-ssu-02_abs", "You mentioned adopting a dog", 0.0, 0.0),
    ],
)
def test_score_on_hand_checked_answers(question_id, prediction, f1, em):
    e = env()
    scores = e.score(task(e, question_id), prediction)
    assert scores["f1"] == pytest.approx(f1) and scores["em"] == em and scores["reward"] == scores["f1"]
    assert scores["abstained"] == float(abstains(prediction))
    assert "judge" not in scores  # no judge unless one is configured


@pytest.mark.parametrize("reply", [
    "I don't know", "I do not know.", "I dont know", "I’m not sure.", "You haven't mentioned that.",
    "That was not mentioned in our chats.", "There is no information about your cat.",
    "Not enough information to answer.", "I can't answer that from our conversation.", "Unknown", "N/A",
    "The chat history does not say.", "I don't have any information about a cat.",
    "That information is unavailable.", "Not mentioned in the conversation", "No information available",
    "You never told me about a cat.", "I cannot determine that.", "It isn't in the chat history.",
    "You did not specify a breed.", "I don't have that information.", "The chats don't mention it.",
    "I do not remember.", "No idea", "The conversation does not include this.", "I'm not sure, sorry.",
    "It wasn't mentioned.", "That information was not provided.", "I don't recall you saying.",
    "I'm not sure what breed your cat is.", "I'm not sure. You never told me.",
])
def test_abstention_is_detected(reply):
    assert abstains(reply)


@pytest.mark.parametrize("reply", [
    "Border Collie", "In the garage", "12 days", "I know it is a Border Collie", "You mentioned Blue Heron Ferries.",
    "Unknown Pleasures", "It is not a cat, it is a dog", "3", "", "Nothing beats a history podcast",
    "You said the informative one",
    # A hedge with an answer after it answers.
    "I'm not sure, but probably Paris", "I'm not sure, it was Paris", "I'm not sure: probably the garage",
    "I don't know exactly, but it might have been May", "No idea, maybe Paris", "I can't recall, but I think 12 days",
    # "not given" / "not provided" / "include" in an answer.
    "It was not given until Tuesday", "It was not provided by the shop, you bought it",
    "The recipe does not include eggs",
])
def test_answers_are_not_taken_for_abstention(reply):
    assert not abstains(reply)


def test_summarize_per_type_and_abstention():
    records = [
        {"question_id": "a", "category": "single-session-user", "f1": 1.0, "em": 1.0, "abstained": 0.0},
        {"question_id": "b", "category": "single-session-user", "f1": 0.5, "em": 0.0, "abstained": 0.0},
        {"question_id": "c_abs", "category": "single-session-user", "f1": 1.0, "em": 1.0, "abstained": 1.0},
        {"question_id": "d_abs", "category": "multi-session", "f1": 0.0, "em": 0.0, "abstained": 0.0},
        {"question_id": "e", "category": "temporal-reasoning", "f1": 0.0, "em": 0.0, "abstained": 1.0},
    ]
    summary = env().summarize(records)
    assert list(summary["f1_by_category"]) == list(QUESTION_TYPES)  # every type, in the official order
    assert summary["f1_by_category"]["single-session-user"] == pytest.approx(2.5 / 3)
    assert summary["em_by_category"]["single-session-user"] == pytest.approx(2 / 3)
    assert summary["f1_by_category"]["multi-session"] == 0.0 and summary["f1_by_category"]["knowledge-update"] is None
    assert summary["n_by_category"] == {"single-session-user": 3, "single-session-assistant": 0,
                                        "single-session-preference": 0, "multi-session": 1,
                                        "temporal-reasoning": 1, "knowledge-update": 0}
    assert summary["abstention_accuracy"] == 0.5  # c_abs declined, d_abs answered
    assert summary["abstained_answerable"] == pytest.approx(1 / 3)  # e declined an answerable question
    assert "judge" not in summary and "judge_by_category" not in summary

    judged = [{**r, "judge": j} for r, j in zip(records, (1.0, 0.0, 1.0, 1.0, 0.0))]
    summary = env().summarize(judged)
    assert summary["judge"] == pytest.approx(3 / 5)
    assert summary["judge_by_category"]["single-session-user"] == pytest.approx(2 / 3)
    assert summary["judge_by_category"]["multi-session"] == 1.0
    assert summary["judge_by_category"]["knowledge-update"] is None

    empty = env().summarize([])
    assert empty["abstention_accuracy"] is None and set(empty["f1_by_category"].values()) == {None}


# ---- the judge -----------------------------------------------------------------------------------------------


def test_a_judge_callable_adds_its_verdict_once_per_answer():
    calls = []

    def judge(question, answer, prediction, question_type, abstention):
        calls.append((question, answer, prediction, question_type, abstention))
        return "heron" in prediction.lower() or (abstention and "no idea" in prediction)

    e = env(judge=judge)
    ssa = task(e, "lme-ssa-01")
    scores = e.score(ssa, "the Blue Heron ferry")
    assert scores["judge"] == 1.0 and scores["f1"] < 1.0  # the judge accepts what F1 only partly credits
    assert e.score(ssa, "Port Ellis Ferries")["judge"] == 0.0
    assert e.score(ssa, "the Blue Heron ferry")["judge"] == 1.0
    assert calls[0] == ("Which ferry company did you recommend for my trip to the Marlow Islands?",
                        "Blue Heron Ferries", "the Blue Heron ferry", "single-session-assistant", False)
    assert len(calls) == 2  # the repeated answer was judged once
    abstention = task(e, "lme-ssu-02_abs")
    assert e.score(abstention, "no idea")["judge"] == 1.0 and calls[-1][4] is True
    assert "judge" not in env().score(ssa, "the Blue Heron ferry")


@pytest.mark.parametrize("verdict, passed", [(True, 1.0), (False, 0.0), (1, 1.0), (0, 0.0)])
def test_a_judge_may_return_a_bool_like_value(verdict, passed):
    np = pytest.importorskip("numpy")
    ssa = env().task(1)
    assert env(judge=lambda *args: verdict).score(ssa, "x")["judge"] == passed
    assert env(judge=lambda *args: np.bool_(verdict)).score(ssa, "x")["judge"] == passed


@pytest.mark.parametrize("verdict", ["yes", None, 2, 0.5, 1.0])
def test_a_judge_verdict_that_is_not_bool_like_is_one_line(verdict):
    with pytest.raises(JudgeError, match="must return True or False") as err:
        env(judge=lambda *args: verdict).score(env().task(1), "x")
    assert repr(verdict) in str(err.value) and "\n" not in str(err.value)


def test_judge_prompts_follow_the_official_rules_per_type():
    general = judge_prompt("Q?", "Gold", "Reply", "multi-session", False)
    assert "Question: Q?" in general and "Correct answer: Gold" in general and "Model reply: Reply" in general
    assert general.endswith("Reply with yes or no only.")
    assert judge_prompt("Q?", "Gold", "Reply", "single-session-user", False) == general
    temporal = judge_prompt("Q?", "18 days", "19 days", "temporal-reasoning", False)
    assert temporal.startswith(general.split("\n")[0]) and "off-by-one" in temporal
    assert "updated one" in judge_prompt("Q?", "Gold", "Reply", "knowledge-update", False)
    preference = judge_prompt("Q?", "Likes history", "Reply", "single-session-preference", False)
    assert "Rubric: Likes history" in preference and "personal information" in preference
    abstention = judge_prompt("Q?", "Never said", "Reply", "temporal-reasoning", True)
    assert "Explanation: Never said" in abstention and "cannot be answered" in abstention
    assert "off-by-one" not in abstention
    with pytest.raises(ValueError, match="question_type"):
        judge_prompt("Q?", "Gold", "Reply", "open-domain", False)


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Answers chat completions "Yes." when the model reply names Blue Heron; records every request."""

    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append((self.path, self.headers.get("Authorization"), body))
        if self.path.startswith("/broken"):
            self.send_response(500)
            self.end_headers()
            return
        if self.path.startswith("/truncated"):  # promises more than it sends, then closes
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"choices": ')
            return
        prompt = body["messages"][0]["content"]
        verdict = "Yes." if "Model reply: the Blue Heron" in prompt else "No"
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_openai():
    _FakeOpenAI.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_openai_compatible_judge_is_asked_over_http(fake_openai, monkeypatch):
    monkeypatch.setenv("LME_TEST_KEY", "secret-key")
    e = make_env("longmemeval", data=str(FIXTURE), judge_url=fake_openai + "/v1/", judge_model="judge-7b",
                 judge_api_key_env="LME_TEST_KEY")
    ssa = task(e, "lme-ssa-01")
    assert e.score(ssa, "the Blue Heron ferry")["judge"] == 1.0
    assert e.score(ssa, "Port Ellis Ferries")["judge"] == 0.0
    path, authorization, body = _FakeOpenAI.requests[0]
    assert path == "/v1/chat/completions" and authorization == "Bearer secret-key"
    assert body["model"] == "judge-7b" and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": judge_prompt(
        ssa.metadata["question"], "Blue Heron Ferries", "the Blue Heron ferry", "single-session-assistant", False)}]

    monkeypatch.delenv("LME_TEST_KEY")
    env(judge_url=fake_openai, judge_api_key_env="LME_TEST_KEY").score(ssa, "x")
    assert _FakeOpenAI.requests[-1][1] is None  # no key in the environment: no Authorization header


def test_the_openai_key_goes_to_api_openai_com_only_unless_named(fake_openai, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    ssa = env().task(1)
    env(judge_url=fake_openai).score(ssa, "x")
    assert _FakeOpenAI.requests[-1][1] is None  # another host: not sent by default
    env(judge_url=fake_openai, judge_api_key_env="OPENAI_API_KEY").score(ssa, "y")
    assert _FakeOpenAI.requests[-1][1] == "Bearer openai-key"  # named explicitly: sent

    sent = []

    class Reply:
        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def read(self):
            return json.dumps({"choices": [{"message": {"content": "yes"}}]}).encode()

    def urlopen(request, timeout):
        sent.append((request.full_url, request.get_header("Authorization")))
        return Reply()

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    env(judge_url="https://API.openai.com/v1").score(ssa, "x")
    assert sent == [("https://API.openai.com/v1/chat/completions", "Bearer openai-key")]
    env(judge_url="https://api.openai.com.example.net/v1").score(ssa, "x")
    assert sent[-1][1] is None


def test_a_failing_judge_endpoint_is_one_line_naming_the_url(fake_openai):
    ssa = env().task(1)
    with pytest.raises(JudgeError) as err:
        env(judge_url=fake_openai + "/broken").score(ssa, "x")
    assert f"{fake_openai}/broken/chat/completions: HTTP 500" in str(err.value) and "\n" not in str(err.value)

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(JudgeError, match=f"{closed}/chat/completions: cannot be reached"):
        env(judge_url=closed).score(ssa, "x")

    with pytest.raises(JudgeError, match=f"{fake_openai}/truncated/chat/completions: no complete reply "
                                         r"\(IncompleteRead") as err:
        env(judge_url=fake_openai + "/truncated").score(ssa, "x")
    assert "\n" not in str(err.value)


def test_judge_settings_are_checked():
    with pytest.raises(InputError, match="not both"):
        env(judge=lambda *a: True, judge_url="http://localhost:1")
    with pytest.raises(InputError, match="judge_url must be an http"):
        env(judge_url="localhost:8000")
    with pytest.raises(InputError, match="judge must be a callable"):
        env(judge="gpt-4o")
    with pytest.raises(InputError, match="judge_timeout"):
        env(judge_url="http://localhost:1", judge_timeout=0)


# ---- settings ------------------------------------------------------------------------------------------------


def test_subsets_by_type_id_and_count():
    per_type = env(per_category=1).tasks()
    assert [t.task_id for t in per_type] == IDS[:6]  # the first item of each type; the _abs one is a second ssu
    assert [t.task_id for t in env(question_types=["multi-session", "knowledge-update"]).tasks()] == \
        ["lme-multi-01", "lme-ku-01"]
    assert [t.task_id for t in env(sample_ids=["lme-ku-01", "lme-ssa-01"]).tasks()] == ["lme-ssa-01", "lme-ku-01"]
    assert [t.task_id for t in env(max_items=2).tasks()] == IDS[:2]
    assert len(env(per_category=0)) == 0
    with pytest.raises(LongMemEvalFormatError, match="unknown question_id 'nope'; the file has 7"):
        env(sample_ids=["nope"])
    with pytest.raises(InputError, match="unknown question_types 'open-domain'"):
        env(question_types=["open-domain"])
    with pytest.raises(InputError, match="max_items must be None or an integer >= 0"):
        env(max_items=-1)
    with pytest.raises(InputError, match="sample_ids must be None or a list of strings"):
        env(sample_ids="lme-ku-01")


def test_data_is_required_and_settings_are_named():
    with pytest.raises(InputError, match="does not download LongMemEval.*longmemeval_s.json.*--data"):
        make_env("longmemeval")
    with pytest.raises(InputError) as err:
        make_env("longmemeval", data=str(FIXTURE), max_questions=3)
    assert "'max_questions'" in str(err.value) and "max_items" in str(err.value) and "judge_url" in str(err.value)


def test_items_without_a_gold_answer_are_skipped_and_listed(tmp_path):
    raw = json.loads(FIXTURE.read_text())
    del raw[1]["answer"]
    raw[4]["answer"] = "  "
    path = tmp_path / "unanswered.json"
    path.write_text(json.dumps(raw))
    e = LongMemEvalEnv(str(path))
    assert [t.task_id for t in e.tasks()] == [IDS[0], *IDS[2:4], *IDS[5:]]
    assert e.skipped == [
        {"question_id": "lme-ssa-01", "index": 1, "question": raw[1]["question"], "reason": "no gold answer"},
        {"question_id": "lme-temp-01", "index": 4, "question": raw[4]["question"], "reason": "no gold answer"},
    ]


# ---- malformed files -----------------------------------------------------------------------------------------


def _set(*keys, value):
    def mutate(raw):
        node = raw
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return mutate


def _delete(*keys):
    def mutate(raw):
        node = raw
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    return mutate


def _empty_haystack(raw):
    raw[2].update(haystack_session_ids=[], haystack_dates=[], haystack_sessions=[])


def _no_turns(raw):
    raw[2]["haystack_sessions"] = [[], []]


SSA = "item 1 (question_id lme-ssa-01)"
MULTI = "item 3 (question_id lme-multi-01)"


@pytest.mark.parametrize(
    "mutate, where, message",
    [
        (_set(2, value="an item"), "item 2", "expected an object, got str"),
        (_delete(1, "question_id"), "item 1", "missing field 'question_id'"),
        (_set(1, "question_id", value=7), "item 1", "field 'question_id' must be a string, got 7"),
        (_set(1, "question_id", value=""), "item 1", "field 'question_id' must be a non-empty string"),
        (_set(1, "question_type", value="multi-sessions"), SSA,
         "field 'question_type' must be one of single-session-user, "),
        (_delete(1, "question_type"), SSA, "missing field 'question_type'"),
        (_delete(1, "question"), SSA, "missing field 'question'"),
        (_set(1, "question", value=["Which?"]), SSA, "field 'question' must be a string"),
        (_set(1, "answer", value=["Blue Heron"]), SSA, "field 'answer' must be a string or a number"),
        (_set(1, "answer", value=True), SSA, "field 'answer' must be a string or a number, got True"),
        (_delete(1, "question_date"), SSA, "missing field 'question_date'"),
        (_set(1, "question_date", value="August 15, 2023"), SSA,
         "field 'question_date' must be a date like '2023/05/20 (Sat) 02:21', got 'August 15, 2023'"),
        (_set(3, "haystack_dates", 1, value="2023/13/22 (Wed) 11:05"), MULTI,
         "field 'haystack_dates[1]' must be a date"),
        (_set(3, "haystack_dates", 2, value=20230418), MULTI, "field 'haystack_dates[2]' must be a string"),
        (_set(3, "haystack_dates", value="2023/05/12 (Fri) 18:20"), MULTI,
         "field 'haystack_dates' must be a list of strings, got str"),
        (_delete(3, "haystack_dates", 0), MULTI,
         "fields 'haystack_session_ids', 'haystack_dates' and 'haystack_sessions' must have equal lengths, got "
         "'haystack_session_ids' 4, 'haystack_dates' 3, 'haystack_sessions' 4"),
        (_delete(3, "haystack_session_ids"), MULTI, "missing field 'haystack_session_ids'"),
        (_set(3, "haystack_sessions", value={"a": []}), MULTI, "field 'haystack_sessions' must be a list of sessions"),
        (_empty_haystack, "item 2 (question_id lme-pref-01)", "field 'haystack_sessions' is empty"),
        (_no_turns, "item 2 (question_id lme-pref-01)", "field 'haystack_sessions' holds no turns"),
        (_set(3, "haystack_sessions", 2, value="hello"), MULTI,
         "field 'haystack_sessions[2]' must be a list of turns, got str"),
        (_set(3, "haystack_sessions", 2, 1, value="assistant: hi"), MULTI,
         "field 'haystack_sessions[2][1]' must be a turn object"),
        (_delete(3, "haystack_sessions", 2, 1, "role"), MULTI, "missing field 'haystack_sessions[2][1].role'"),
        (_set(3, "haystack_sessions", 2, 1, "role", value="system"), MULTI,
         "field 'haystack_sessions[2][1].role' must be 'user' or 'assistant', got 'system'"),
        (_delete(3, "haystack_sessions", 0, 0, "content"), MULTI, "missing field 'haystack_sessions[0][0].content'"),
        (_set(3, "haystack_sessions", 0, 0, "content", value=None), MULTI,
         "field 'haystack_sessions[0][0].content' must be a string, got None"),
        (_set(3, "haystack_sessions", 0, 0, "has_answer", value="yes"), MULTI,
         "field 'haystack_sessions[0][0].has_answer' must be true or false"),
        (_set(3, "haystack_sessions", 0, 0, "content", value="half a character: \ud800"), MULTI,
         "field 'haystack_sessions[0][0].content' must be Unicode text; it has a lone surrogate"),
        (_delete(3, "answer_session_ids"), MULTI, "missing field 'answer_session_ids'"),
        (_set(3, "answer_session_ids", value="multi-01-a"), MULTI, "field 'answer_session_ids' must be a list"),
        (_set(3, "question_id", value="lme-ssu-01"), "", "field 'question_id' must be unique; repeated: "
         "lme-ssu-01 (items 0, 3)"),
    ],
)
def test_a_malformed_item_is_one_line_naming_file_item_and_field(tmp_path, mutate, where, message):
    raw = json.loads(FIXTURE.read_text())
    mutate(raw)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(raw))  # ASCII: a lone surrogate stays the escape \ud800, as a JSON writer leaves it
    with pytest.raises(LongMemEvalFormatError) as err:
        load_longmemeval(path)
    text = str(err.value)
    assert text.startswith(f"{path}: {where + ': ' if where else ''}{message}"), text
    assert "\n" not in text
    text.encode("utf-8")  # printable as it is


@pytest.mark.parametrize(
    "content, message",
    [("[{", "not valid JSON at line 1"), ('{"question_id": "x"}', "expected a JSON list of items, got dict"),
     ("[]", "no items; expected a JSON list of LongMemEval items")],
)
def test_a_file_that_is_not_a_list_of_items(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(LongMemEvalFormatError, match=message) as err:
        LongMemEvalEnv(str(path))
    assert str(err.value).startswith(str(path))


# ---- episodes on the tiny model ------------------------------------------------------------------------------


def test_an_evaluation_on_the_tiny_model_scores_every_item_by_type(tmp_path):
    summary = run_eval(EvalConfig(
        out=str(tmp_path), env="longmemeval", data=str(FIXTURE), model="tiny", methods=["none", "tmem"],
        episode=EpisodeConfig(l_max=64, max_answer_tokens=4, max_extraction_tokens=12),
        fast_weights=FastWeightConfig(epochs=1), device="cpu",
    ))
    records = read_records(tmp_path / "results.jsonl")
    categories = {t.task_id: t.metadata["category"] for t in env().tasks()}
    for method in ("none", "tmem"):
        mine = [r for r in records if r["method"] == method]
        assert {r["question_id"]: r["category"] for r in mine} == categories
        assert all(r["sample_id"] == r["question_id"] and r["abstained"] in (0.0, 1.0) for r in mine)
        assert all("judge" not in r for r in mine)
        assert "(asked on " in mine[0]["question"]
        assert summary[method]["n"] == 7 and summary[method]["skipped"] == 0
        assert list(summary[method]["f1_by_category"]) == list(QUESTION_TYPES)
        assert summary[method]["n_by_category"]["single-session-user"] == 2
        assert summary[method]["abstention_accuracy"] in (0.0, 1.0)
    assert all(r["extractions"] for r in records if r["method"] == "tmem"), "every stream is over L_max = 64"


def test_an_evaluation_with_an_http_judge_reports_its_accuracy(tmp_path, fake_openai):
    summary = run_eval(EvalConfig(
        out=str(tmp_path), env="longmemeval", data=str(FIXTURE), model="tiny", methods=["none"],
        episode=EpisodeConfig(max_answer_tokens=4), device="cpu", per_category=1,
        env_kwargs={"judge_url": fake_openai},
    ))
    records = read_records(tmp_path / "results.jsonl")
    assert len(records) == 6 and all(r["judge"] == 0.0 for r in records)  # the fake says yes to Blue Heron only
    assert len(_FakeOpenAI.requests) == 6
    assert summary["none"]["judge"] == 0.0
    assert summary["none"]["judge_by_category"] == {t: 0.0 for t in QUESTION_TYPES}


def test_the_cli_evaluates_longmemeval(tmp_path):
    # One item (--sample-ids takes question ids): tmem's full-length extractions on a CPU take a while each.
    out = tmp_path / "run"
    assert main(["eval", "--env", "longmemeval", "--data", str(FIXTURE), "--model", "tiny", "--out", str(out),
                 "--method", "none", "tmem", "--greedy", "--l-max", "64", "--device", "cpu", "--inner-epochs", "1",
                 "--sample-ids", "lme-ssa-01"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"none", "tmem"}
    for row in summary.values():
        assert row["n"] == 1 and row["n_by_category"]["single-session-assistant"] == 1
        assert list(row["f1_by_category"]) == list(QUESTION_TYPES) == list(row["em_by_category"])
        assert row["f1_by_category"]["single-session-assistant"] is not None
        assert row["f1_by_category"]["multi-session"] is None
    table = (out / "summary.md").read_text()
    assert "single-session-assistant" in table and "| tmem |" in table


def test_the_cli_without_data_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["eval", "--env", "longmemeval", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err and "longmemeval_s.json" in err
    assert not (tmp_path / "run").exists()
