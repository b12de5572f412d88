"""Properties of the QA-pair parser on any text a model can sample: it never raises, and it never loses a pair
it could read."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmem_rl.records import ParseRecord, QAPair
from tmem_rl.extraction import PairReader, parse_qa_pairs

# Deadlines off: a few thousand brackets take milliseconds here but may take far longer on a loaded CI machine.
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fold(text: str) -> str:
    return " ".join(text.casefold().split())


def check_record(record: ParseRecord, text: str, source: str | None) -> None:
    assert isinstance(record, ParseRecord)
    assert record.raw == text
    assert record.pairs or record.error
    for pair in record.pairs:
        assert pair.instruction.strip() and pair.output.strip()
        if source is not None:
            assert fold(pair.output) in fold(source)


def parse_and_check(text: str, prefilled: bool = False, source: str | None = None) -> ParseRecord:
    record = parse_qa_pairs(text, prefilled=prefilled, source=source)
    check_record(record, text, source)
    return record


sources = st.none() | st.text(max_size=200)


# ----------------------------------------------------------------------------------------------------------------
# (a) Arbitrary text
# ----------------------------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(text=st.text(), prefilled=st.booleans(), source=sources)
def test_arbitrary_text_never_raises(text, prefilled, source):
    parse_and_check(text, prefilled, source)


# Surrogate code points, raw or as JSON escapes, and integer literals longer than Python converts.
HOSTILE = st.sampled_from(["\ud800", "\udfff", "\\ud800", "\\udc00", "\\ud83d\\ude00", "7" * 4301, "-" + "1" * 5000])
PAIR_WITH = st.tuples(HOSTILE | st.text(max_size=5), HOSTILE | st.text(max_size=5)).map(
    lambda qa: f'{{"instruction": "Q {qa[0]}", "output": "A {qa[1]}"}}, {{"q": 1, "a": {qa[1]}}}'
)


@PROPERTY_SETTINGS
@given(text=st.lists(PAIR_WITH | HOSTILE | st.text(st.characters(exclude_categories=()), max_size=20), max_size=8)
       .map(lambda parts: "[" + ", ".join(parts)), source=sources)
def test_every_kept_pair_has_a_utf8_form(text, source):
    record = parse_and_check(text, source=source)
    for pair in record.pairs:
        text = pair.instruction + pair.output
        assert text.encode("utf-8").decode("utf-8") == text  # raises on a lone surrogate


# ----------------------------------------------------------------------------------------------------------------
# (b) Text built from JSON fragments, with runs of deep nesting
# ----------------------------------------------------------------------------------------------------------------

WORDS = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="`"), min_size=1, max_size=8)
FRAGMENTS = st.sampled_from(
    ["[", "]", "{", "}", '"', ",", ":", " ", "\n", "\\", "```", "```json\n", "null", "1", "true",
     '"instruction"', '"output"', '"question"', '"answer"', '"q"', '"a"', '"pairs"', '"Jo Park"', '"x"']
) | WORDS.map(json.dumps) | WORDS
DEEP_OPENERS = st.sampled_from(["[", "{", "[{", "[ ", "[1,", '{"a":', '{"a":[', '[{"instruction":', '["x",', '"['])


@st.composite
def json_fragments(draw) -> str:
    pieces = draw(st.lists(FRAGMENTS, max_size=60))
    for _ in range(draw(st.integers(0, 2))):  # runs of openers, some deeper than the decoder's recursion limit
        run = draw(DEEP_OPENERS) * draw(st.integers(0, 3000))
        pieces.insert(draw(st.integers(0, len(pieces))), run)
    return "".join(pieces)


@PROPERTY_SETTINGS
@given(text=json_fragments(), prefilled=st.booleans(), source=sources)
def test_json_fragments_never_raise(text, prefilled, source):
    record = parse_and_check(text, prefilled, source)
    assert record.pairs or record.error


# ----------------------------------------------------------------------------------------------------------------
# (c) Valid pair lists in prose or fences, possibly cut off
# ----------------------------------------------------------------------------------------------------------------

# Prose without brackets, quotes or backticks, so that it cannot itself read as JSON or as a fence.
PROSE = st.text(alphabet=st.sampled_from(list("abcdefghij XYZ.,!?:;-\n")), max_size=40)
# Fences inside a string are read as fences, so pair text leaves out backticks.
PAIR_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="`"), max_size=20)
INSTRUCTION_KEYS = st.sampled_from(["instruction", "question", "Q", "query"])
OUTPUT_KEYS = st.sampled_from(["output", "answer", "A", "response"])


@st.composite
def pair_lists(draw) -> list[tuple[QAPair, dict[str, str]]]:
    """Pairs with their JSON objects; the numbered prefixes keep them distinct and questions unlike answers."""
    texts = draw(st.lists(st.tuples(PAIR_TEXT, PAIR_TEXT), min_size=1, max_size=6))
    result = []
    for i, (question, answer) in enumerate(texts):
        pair = QAPair(f"Q{i} {question}".strip(), f"A{i} {answer}".strip())
        item = {draw(INSTRUCTION_KEYS): f"Q{i} {question}", draw(OUTPUT_KEYS): f"A{i} {answer}"}
        result.append((pair, item))
    return result


@st.composite
def model_outputs(draw) -> dict:
    """A model's answer: a JSON list of pairs in prose or a fence, maybe cut off by the token limit, maybe
    continuing a prefilled "[". Also returns the pairs that were complete before the cut."""
    listed = draw(pair_lists())
    ensure_ascii = draw(st.booleans())
    separator = draw(st.sampled_from([", ", ",", ",\n  ", ",\n"]))
    encoded = [json.dumps(item, ensure_ascii=ensure_ascii) for _, item in listed]
    body = "[" + separator.join(encoded) + "]"
    item_ends = []  # where each item's closing brace ends within body
    end = 1
    for piece in encoded:
        end += len(piece)
        item_ends.append(end)
        end += len(separator)

    cut = draw(st.integers(1, len(body))) if draw(st.booleans()) else len(body)
    was_cut = cut < len(body)
    complete = [pair for (pair, _), item_end in zip(listed, item_ends) if item_end <= cut]
    body = body[:cut]
    # A prefilled answer continues the "[" directly; otherwise the model may open with prose and a fence.
    prefilled = draw(st.booleans())
    if prefilled:
        body = body[1:]
        before, fence = "", ""
    else:
        before, fence = draw(PROSE), draw(st.sampled_from(["", "```json\n", "```\n"]))
    after = ""
    if not was_cut:  # only an answer that was not cut off can close its fence and say more
        after = ("\n```" if fence else "") + draw(PROSE)
    return {
        "text": before + fence + body + after,
        "prefilled": prefilled,
        "complete": complete,
        "all_pairs": [pair for pair, _ in listed],
        "closed": not was_cut,
    }


@PROPERTY_SETTINGS
@given(output=model_outputs())
def test_every_complete_pair_before_the_cut_is_recovered(output):
    record = parse_and_check(output["text"], output["prefilled"])
    assert record.pairs == output["complete"]


@PROPERTY_SETTINGS
@given(output=model_outputs(), data=st.data())
def test_with_a_source_exactly_the_grounded_complete_pairs_are_kept(output, data):
    chosen = data.draw(st.lists(st.sampled_from(output["all_pairs"]), max_size=len(output["all_pairs"])))
    source = " ".join(pair.output for pair in chosen) + data.draw(PROSE)
    record = parse_and_check(output["text"], output["prefilled"], source)
    assert record.pairs == [pair for pair in output["complete"] if fold(pair.output) in fold(source)]


# ----------------------------------------------------------------------------------------------------------------
# The reader that stops an extraction once its pairs are written agrees with the parser
# ----------------------------------------------------------------------------------------------------------------


def read_in_pieces(text: str, cuts: list[int], max_pairs: int = 100, prefilled: bool = False) -> tuple:
    """Feed `text` cut at `cuts` -> (reason, pairs read, index of the character it stopped at or None)."""
    reader = PairReader(max_pairs, prefilled)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    for start, end in zip(bounds, bounds[1:]):
        if reader.feed(text[start:end]) is not None:
            # The piece it stopped in, read again one character at a time, says where.
            return reader.reason, reader.pairs, start + stop_index(text[:end], start, max_pairs, prefilled)
    return reader.reason, reader.pairs, None


def stop_index(text: str, start: int, max_pairs: int, prefilled: bool) -> int:
    reader = PairReader(max_pairs, prefilled)
    reader.feed(text[:start])
    return next(i for i, char in enumerate(text[start:]) if reader.feed(char) is not None)


@PROPERTY_SETTINGS
@given(text=st.one_of(st.text(), json_fragments(), model_outputs().map(lambda o: o["text"])),
       cuts=st.lists(st.integers(0, 10_000), max_size=12), prefilled=st.booleans(), max_pairs=st.integers(1, 4))
def test_the_reader_never_raises_and_reads_alike_however_the_text_is_split(text, cuts, prefilled, max_pairs):
    whole = read_in_pieces(text, [], max_pairs, prefilled)
    assert read_in_pieces(text, cuts, max_pairs, prefilled) == whole
    assert whole[0] in (None, "max_pairs", "repeat", "closed")


@PROPERTY_SETTINGS
@given(output=model_outputs(), max_pairs=st.integers(1, 7))
def test_the_reader_stops_where_the_parser_has_read_the_pairs_it_counted(output, max_pairs):
    text, complete = output["text"], output["complete"]
    reason, counted, stop = read_in_pieces(text, [], max_pairs, output["prefilled"])
    assert counted == min(len(complete), max_pairs)
    if len(complete) >= max_pairs:
        assert reason == "max_pairs"
    else:
        assert reason == ("closed" if output["closed"] else None)
    kept = text if stop is None else text[: stop + 1]
    assert parse_qa_pairs(kept, output["prefilled"]).pairs == complete[:max_pairs]


@PROPERTY_SETTINGS
@given(listed=pair_lists(), data=st.data())
def test_a_repeat_stops_the_reader_and_the_text_before_it_parses_to_the_new_pairs(listed, data):
    encoded = [json.dumps(item) for _, item in listed]
    at = data.draw(st.integers(1, len(encoded)))
    pair, _ = listed[data.draw(st.integers(0, at - 1))]
    # The same pair under other key names, case and spacing: the parser's duplicate.
    again = {data.draw(INSTRUCTION_KEYS): pair.instruction.upper(), data.draw(OUTPUT_KEYS): f" {pair.output} "}
    encoded.insert(at, json.dumps(again))
    text = "[" + ", ".join(encoded) + "]"
    reason, counted, stop = read_in_pieces(text, data.draw(st.lists(st.integers(0, len(text)))))
    assert (reason, counted) == ("repeat", at)
    assert stop == len("[" + ", ".join(encoded[: at + 1])) - 1
    before = parse_qa_pairs("[" + ", ".join(encoded[:at]))  # no closing bracket: the parser does not need one
    assert before.pairs == [p for p, _ in listed[:at]] and before.dropped == [] and before.error is None


# ----------------------------------------------------------------------------------------------------------------
# Deep nesting, the case that once ended a training run
# ----------------------------------------------------------------------------------------------------------------


def test_a_thousand_open_brackets_give_an_error_not_an_exception():
    text = "[" * 1000
    record = parse_qa_pairs(text)
    assert record.pairs == []
    assert record.error == "nesting too deep"
    assert record.raw == text


def test_pairs_after_a_too_deep_run_are_still_found():
    text = "[" * 3000 + '[{"instruction": "Who founded Acme?", "output": "Jo Park"}]'
    record = parse_qa_pairs(text)
    assert [(p.instruction, p.output) for p in record.pairs] == [("Who founded Acme?", "Jo Park")]


# ----------------------------------------------------------------------------------------------------------------
# The runner's whole extraction step: whatever the policy writes, the episode goes on and its record is JSON
# ----------------------------------------------------------------------------------------------------------------

_RUNNER: dict = {}


def scripted_runner():
    """One small model for every example (hypothesis re-runs the test body, not the fixtures)."""
    if not _RUNNER:
        from test_rollout import ScriptedRunner

        from tmem_rl.envs import make_env
        from tmem_rl.memory import FastWeightConfig, FastWeights
        from tmem_rl.models import tiny_model
        from tmem_rl.episode import EpisodeConfig

        model, tok = tiny_model(num_layers=2)
        fast = FastWeights(model, 1, FastWeightConfig(num_layers=1, lr=0.05, epochs=1))
        env = make_env("facts", num_tasks=1, num_distractors=4, num_facts=2, lines_per_chunk=2)
        config = EpisodeConfig(l_max=40, extraction_retries=1, max_extraction_tokens=999_999)
        _RUNNER.update(runner=ScriptedRunner(model, tok, fast, config), env=env)
    return _RUNNER["runner"], _RUNNER["env"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(max_size=300), json_fragments(), model_outputs().map(lambda o: o["text"])))
def test_the_runner_extraction_step_never_raises(text):
    runner, env = scripted_runner()
    runner.extraction_text = text
    batch = runner.run(env, [env.task(0)])
    trajectory = batch.trajectories[0]
    assert trajectory.extractions, "the stream must exceed the budget for this to test anything"
    for extraction in trajectory.extractions:
        attempts = extraction.supervision.attempts
        assert attempts and all(a.pairs or a.error for a in attempts)
    json.loads(json.dumps(batch.to_dict()))
