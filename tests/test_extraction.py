"""The QA-pair parser on the ways small models get JSON wrong, and the extraction / answer prompts."""

from __future__ import annotations

import json
import time

from tmem_rl.records import QAPair
from tmem_rl.extraction import (
    PairReader,
    grounded,
    EXTRACTION_PREFILL,
    answer_messages,
    extraction_messages,
    parse_qa_pairs,
)


def pairs(record):
    return [(p.instruction, p.output) for p in record.pairs]


def reasons(record):
    return [d["reason"] for d in record.dropped]


CLEAN = '[{"instruction": "Who founded Acme?", "output": "Jo Park"}, {"instruction": "When?", "output": "1999"}]'
CLEAN_PAIRS = [("Who founded Acme?", "Jo Park"), ("When?", "1999")]


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------


def test_clean_list():
    record = parse_qa_pairs(CLEAN)
    assert pairs(record) == CLEAN_PAIRS
    assert record.dropped == []
    assert record.error is None
    assert record.raw == CLEAN


def test_json_code_fence():
    record = parse_qa_pairs(f"```json\n{CLEAN}\n```")
    assert pairs(record) == CLEAN_PAIRS
    assert record.error is None


def test_plain_code_fence():
    record = parse_qa_pairs(f"```\n{CLEAN}\n```")
    assert pairs(record) == CLEAN_PAIRS


def test_unterminated_code_fence():
    record = parse_qa_pairs(f"```json\n{CLEAN}\n")
    assert pairs(record) == CLEAN_PAIRS
    assert record.error is None


def test_fence_with_prose_outside_it():
    text = f"Here are the pairs [as asked]:\n```json\n{CLEAN}\n```\nLet me know [if] you need more."
    assert pairs(parse_qa_pairs(text)) == CLEAN_PAIRS


def test_fence_wins_over_json_in_the_prose_before_it():
    # A model echoing the prompt's format line before its fenced answer.
    text = f'Format: {{"instruction": "Q", "output": "A"}}\n```json\n{CLEAN}\n```'
    record = parse_qa_pairs(text)
    assert pairs(record) == CLEAN_PAIRS
    assert record.dropped == []


def test_leading_and_trailing_prose():
    record = parse_qa_pairs(f"Sure! Here are the pairs:\n{CLEAN}\nI hope {{this}} helps.")
    assert pairs(record) == CLEAN_PAIRS
    assert record.dropped == []
    assert record.error is None


def test_bracketed_aside_before_json_is_skipped():
    record = parse_qa_pairs(f"Facts from section [2]:\n{CLEAN}")
    assert pairs(record) == CLEAN_PAIRS
    assert record.dropped == []


def test_truncated_array_keeps_complete_objects():
    text = (
        '[{"instruction": "Who founded Acme?", "output": "Jo Park"}, '
        '{"instruction": "When?", "output": "1999"}, {"instruction": "Where was it'
    )
    record = parse_qa_pairs(text)
    assert pairs(record) == CLEAN_PAIRS
    assert record.dropped == [{"item": '{"instruction": "Where was it', "reason": "truncated"}]
    assert record.error is None


def test_truncated_before_first_object_completes():
    record = parse_qa_pairs('[{"instruction": "Who founded Acme?", "outp')
    assert pairs(record) == []
    assert reasons(record) == ["truncated"]
    assert record.error == "truncated"


def test_truncated_wrapped_list_is_salvaged():
    text = '{"pairs": [{"question": "Who founded Acme?", "answer": "Jo Park"}, {"question": "Wh'
    record = parse_qa_pairs(text)
    assert pairs(record) == [("Who founded Acme?", "Jo Park")]
    assert reasons(record) == ["truncated"]


def test_key_aliases_are_mapped_case_insensitively():
    text = (
        '[{"question": "Q1", "answer": "A1"}, {"Q": "Q2", "A": "A2"}, {"query": "Q3", "response": "A3"}, '
        '{"input": "Q4", "target": "A4"}, {"Prompt": "Q5", "OUTPUT": "A5"}, {" Instruction ": "Q6", "Answer": "A6"}]'
    )
    record = parse_qa_pairs(text)
    assert pairs(record) == [(f"Q{i}", f"A{i}") for i in range(1, 7)]
    assert record.dropped == []


def test_object_without_usable_keys_is_dropped_naming_its_keys():
    text = '[{"instruction": "Q1", "output": "A1"}, {"fact": "Acme is old", "Source": "p1"}]'
    record = parse_qa_pairs(text)
    assert pairs(record) == [("Q1", "A1")]
    assert record.dropped == [
        {"item": {"fact": "Acme is old", "Source": "p1"}, "reason": "no question or answer key (had: fact, source)"}
    ]


def test_single_object_becomes_one_pair():
    record = parse_qa_pairs('{"instruction": "Who founded Acme?", "output": "Jo Park"}')
    assert pairs(record) == [("Who founded Acme?", "Jo Park")]
    assert record.error is None


def test_wrapped_list_is_unwrapped():
    assert pairs(parse_qa_pairs('{"pairs": [{"q": "Q1", "a": "A1"}]}')) == [("Q1", "A1")]
    assert pairs(parse_qa_pairs('{"qa": [{"q": "Q1", "a": "A1"}, {"q": "Q2", "a": "A2"}]}')) == [
        ("Q1", "A1"),
        ("Q2", "A2"),
    ]


def test_scalar_json_is_not_a_list_of_objects():
    for text in ('"Jo Park"', "42", "true"):
        record = parse_qa_pairs(text)
        assert record.pairs == [], text
        assert record.error == "not a list of objects", text


def test_non_object_items_are_dropped():
    record = parse_qa_pairs('["Jo Park", 3, {"instruction": "Q1", "output": "A1"}, null, ["x"]]')
    assert pairs(record) == [("Q1", "A1")]
    assert record.dropped == [
        {"item": "Jo Park", "reason": "not an object"},
        {"item": 3, "reason": "not an object"},
        {"item": None, "reason": "not an object"},
        {"item": ["x"], "reason": "not an object"},
    ]


def test_list_of_only_non_objects_has_error():
    record = parse_qa_pairs('["a", "b"]')
    assert record.pairs == []
    assert reasons(record) == ["not an object", "not an object"]
    assert record.error == "all items dropped"


def test_empty_text():
    for text in ("", "   \n "):
        record = parse_qa_pairs(text)
        assert record.pairs == [] and record.dropped == []
        assert record.error == "empty"


def test_empty_list():
    record = parse_qa_pairs("[]")
    assert record.pairs == []
    assert record.error == "empty"
    assert parse_qa_pairs('{"pairs": []}').error == "empty"


def test_no_json_at_all():
    record = parse_qa_pairs("I could not find any facts in this text.")
    assert record.pairs == []
    assert record.error == "no JSON found"
    assert parse_qa_pairs("See [the text] for {details}.").error == "no JSON found"


def test_numbers_and_bools_become_strings_and_strings_are_stripped():
    text = '[{"instruction": "  How many staff?\\n", "output": 42}, {"instruction": "Listed?", "output": true}]'
    record = parse_qa_pairs(text)
    assert pairs(record) == [("How many staff?", "42"), ("Listed?", "True")]


def test_pairs_with_a_lone_surrogate_are_dropped_with_a_reason():
    # "\\ud800" alone decodes to half a character that no tokenizer can encode; a pair of escapes is one character.
    text = ('[{"instruction": "Who?", "output": "Jo \\ud800"}, {"instruction": "When \\udfff?", "output": "1999"}, '
            '{"instruction": "Which face?", "output": "\\ud83d\\ude00"}]')
    record = parse_qa_pairs(text)
    assert pairs(record) == [("Which face?", "\U0001F600")]
    assert reasons(record) == ["not Unicode text (lone surrogate)"] * 2
    assert parse_qa_pairs('[{"instruction": "Who?", "output": "Jo \\ud800"}]').error == "all items dropped"


def test_an_integer_too_long_for_python_is_kept_as_text():
    digits = "7" * 5000
    record = parse_qa_pairs(f'[{{"instruction": "Which number?", "output": {digits}}}, {{"q": "Q2", "a": 12}}]')
    assert pairs(record) == [("Which number?", digits), ("Q2", "12")]
    # Also in an array cut off by the token limit, read item by item.
    record = parse_qa_pairs(f'{{"instruction": "Which number?", "output": -{digits}}}, {{"q": "Q2"', prefilled=True)
    assert pairs(record) == [("Which number?", "-" + digits)]


def test_a_megabyte_of_openers_is_parsed_in_bounded_time():
    start = time.perf_counter()
    record = parse_qa_pairs('{"' * 500_000)
    elapsed = time.perf_counter() - start
    assert record.pairs == [] and record.error.startswith("no JSON found (gave up after")
    assert elapsed < 10, elapsed  # about 0.05 s; it was quadratic (over a minute)


def test_pairs_after_thousands_of_unreadable_openers_are_found():
    # Past the first suffix window (decodes then run in a later suffix of the text, positions must map back).
    assert pairs(parse_qa_pairs('{"' * 5000 + CLEAN)) == CLEAN_PAIRS
    # A non-pair value found first is only the fallback; the pair list after it wins.
    assert pairs(parse_qa_pairs('{"' * 3000 + "[1] " + '{"' * 3000 + " " + CLEAN)) == CLEAN_PAIRS
    # Without it, the fallback is the answer: [1] holds no object.
    assert parse_qa_pairs('{"' * 3000 + "[1] " + '{"' * 3000).error == "all items dropped"


def test_duplicates_are_dropped_after_folding():
    text = (
        '[{"instruction": "Who founded Acme?", "output": "Jo Park"}, '
        '{"instruction": "who  founded ACME?", "output": " jo park "}, '
        '{"instruction": "Who founded Acme?", "output": "Kim Lee"}]'
    )
    record = parse_qa_pairs(text)
    assert pairs(record) == [("Who founded Acme?", "Jo Park"), ("Who founded Acme?", "Kim Lee")]
    assert record.dropped == [
        {"item": {"instruction": "who  founded ACME?", "output": " jo park "}, "reason": "duplicate"}
    ]


def test_missing_or_empty_question_or_answer():
    text = (
        '[{"instruction": "", "output": "A1"}, {"output": "A2"}, {"instruction": "Q3", "output": "  "}, '
        '{"question": "Q4"}, {"instruction": null, "output": "A5"}, {"instruction": "Q6", "output": "A6"}]'
    )
    record = parse_qa_pairs(text)
    assert pairs(record) == [("Q6", "A6")]
    assert reasons(record) == ["no question", "no question", "no answer", "no answer", "no question"]


def test_question_equal_to_answer_is_dropped():
    record = parse_qa_pairs('[{"instruction": "Jo Park", "output": "jo  PARK"}, {"q": "Q1", "a": "A1"}]')
    assert pairs(record) == [("Q1", "A1")]
    assert record.dropped == [
        {"item": {"instruction": "Jo Park", "output": "jo  PARK"}, "reason": "question equals answer"}
    ]


def test_all_items_dropped_sets_error():
    record = parse_qa_pairs('[{"instruction": "X", "output": "x"}]')
    assert record.pairs == []
    assert record.error == "all items dropped"


def test_trailing_commas_are_tolerated():
    text = '[{"instruction": "Who founded Acme?", "output": "Jo Park",}, {"instruction": "When?", "output": "1999"},\n]'
    record = parse_qa_pairs(text)
    assert pairs(record) == CLEAN_PAIRS
    assert record.dropped == []


def test_commas_inside_strings_are_kept():
    record = parse_qa_pairs('[{"instruction": "Which list?", "output": "a, ]b,}"},]')
    assert pairs(record) == [("Which list?", "a, ]b,}")]


def test_raw_newline_inside_string_is_tolerated():
    record = parse_qa_pairs('[{"instruction": "Where?", "output": "Oslo\nNorway"}]')
    assert pairs(record) == [("Where?", "Oslo\nNorway")]


def test_prefilled_continuation():
    continuation = (
        '{"instruction": "Who founded Acme?", "output": "Jo Park"}, {"instruction": "When?", "output": "1999"}]'
    )
    record = parse_qa_pairs(continuation, prefilled=True)
    assert pairs(record) == CLEAN_PAIRS
    assert record.raw == continuation  # the record keeps the model's own text
    # Without the prefill only the first object would be read as a lone object.
    assert pairs(parse_qa_pairs(continuation)) == [("Who founded Acme?", "Jo Park")]


def test_prefilled_but_model_repeated_the_bracket():
    record = parse_qa_pairs("  " + CLEAN, prefilled=True)
    assert pairs(record) == CLEAN_PAIRS


def test_prefilled_truncated_continuation():
    record = parse_qa_pairs('{"instruction": "When?", "output": "1999"}, {"instruction": "Wh', prefilled=True)
    assert pairs(record) == [("When?", "1999")]
    assert record.dropped == [{"item": '{"instruction": "Wh', "reason": "truncated"}]


def test_prefilled_edge_cases():
    assert parse_qa_pairs("]", prefilled=True).error == "empty"
    assert parse_qa_pairs("", prefilled=True).error == "empty"
    assert parse_qa_pairs("I cannot do that.", prefilled=True).error == "no JSON found"


def test_record_serialises():
    record = parse_qa_pairs('[{"q": "Q1", "a": "A1"}, 5]')
    assert record.to_dict() == {
        "raw": '[{"q": "Q1", "a": "A1"}, 5]',
        "pairs": [{"instruction": "Q1", "output": "A1"}],
        "dropped": [{"item": 5, "reason": "not an object"}],
        "error": None,
    }


# ----------------------------------------------------------------------------------------------------------------
# Knowing when an extraction is done (PairReader)
# ----------------------------------------------------------------------------------------------------------------

P1 = '{"instruction": "Who founded Acme?", "output": "Jo Park"}'
P2 = '{"instruction": "When?", "output": "1999"}'
P3 = '{"instruction": "Where?", "output": "Oslo"}'


def read(text: str, max_pairs: int = 8, prefilled: bool = True, pieces: int = 1) -> tuple[str | None, int, int]:
    """Feed `text` in about `pieces` pieces -> (reason, pairs read, characters read when it stopped)."""
    reader = PairReader(max_pairs, prefilled)
    size = max(1, len(text) // pieces)
    for start in range(0, len(text), size):
        if reader.feed(text[start : start + size]) is not None:
            return reader.reason, reader.pairs, start + size
    return reader.reason, reader.pairs, len(text)


def stop_char(text: str, max_pairs: int = 8, prefilled: bool = True) -> tuple[str | None, int]:
    """(reason, index of the character at which the reader stopped), fed one character at a time."""
    reason, _, end = read(text, max_pairs, prefilled, pieces=len(text))
    return reason, end - 1


def test_the_reader_stops_at_max_pairs_at_a_repeat_and_at_the_closing_bracket():
    text = f" {P1}, {P2}, {P3}]"
    assert stop_char(text, max_pairs=2) == ("max_pairs", text.index(P2) + len(P2) - 1)
    assert stop_char(text) == ("closed", len(text) - 1)
    repeated = f" {P1},\n {P2}, {P1.replace('Who founded', 'who  FOUNDED')}, {P3}"  # case and spaces folded
    assert stop_char(repeated) == ("repeat", repeated.index(P3) - 3)
    assert read(f" {P1}, {P2}, {P3}") == (None, 3, len(f" {P1}, {P2}, {P3}"))  # cut off by the budget: no reason


def test_the_reader_gives_the_same_answer_however_the_text_is_split():
    for text in (f" {P1}, {P2}, {P3}]", f" {P1}, {P1}", "Sure:\n```json\n[" + P1 + ", " + P2 + "]\n```"):
        whole = read(text, max_pairs=3)[:2]
        assert whole[0] is not None
        assert {read(text, max_pairs=3, pieces=n)[:2] for n in (2, 3, 7, len(text))} == {whole}


def test_text_cut_where_the_reader_stops_parses_to_the_pairs_it_counted():
    for text, max_pairs in ((f" {P1}, {P2}, {P3}]", 2), (f" {P1}, {P2}, {P1}, {P3}]", 8), (f" {P1}]", 8)):
        reader = PairReader(max_pairs, prefilled=True)
        kept = ""
        for char in text:
            kept += char
            if reader.feed(char) is not None:
                break
        if reader.reason == "repeat":  # what a stop keeps: through the last new pair
            kept = kept[: kept.rindex(P2) + len(P2)]
        record = parse_qa_pairs(kept, prefilled=True)
        # The parser needs no closing bracket: a list cut after a complete pair loses nothing and drops nothing.
        assert len(record.pairs) == reader.pairs and record.dropped == [] and record.error is None


def test_objects_that_are_not_pairs_are_not_counted_and_only_a_list_of_objects_holds_the_pairs():
    text = f' {{"fact": "Acme"}}, {{"instruction": "Q", "output": "Q"}}, {P1}]'
    assert read(text) == ("closed", 1, len(text))
    # Prose before the list: a bracketed aside holds no object, so the parser reads past it, as does the reader.
    assert read(f"Section [2] pairs: [{P1}, {P2}]", prefilled=False)[:2] == ("closed", 2)
    assert read("[1, 2] and nothing more", prefilled=False) == (None, 0, 23)


def test_the_reader_never_stops_where_it_cannot_follow_the_parser():
    # Pairs in a wrapper object, an object the decoder cannot read (the parser reads nothing after it), a reasoning
    # block (stripped before parsing).
    assert read(f'{{"pairs": [{P1}, {P1}, {P2}]}}', max_pairs=1, prefilled=False)[0] is None
    unreadable = f" {P1}, {{instruction: 'x'}}, {P2}, {P3}, {P1}]"
    assert read(unreadable, max_pairs=2) == (None, 1, len(unreadable))
    thinking = f"<think>I could write [{P1}] but</think>\n[{P1}, {P2}]"
    assert read(thinking, prefilled=False, pieces=len(thinking)) == ("closed", 2, len(thinking))
    assert read(f"<think>[{P1}]", max_pairs=1, prefilled=False)[0] is None  # still thinking


def test_quotes_and_brackets_inside_strings_and_prose_are_text():
    text = f' {{"instruction": "What does \\"[x]\\" mean, {{really}}?", "output": "a list ]"}}, {P1}]'
    assert pairs(parse_qa_pairs(text, prefilled=True))[0] == ('What does "[x]" mean, {really}?', "a list ]")
    assert read(text)[:2] == ("closed", 2)
    assert read(f'He said "[" then [{P1}]', prefilled=False)[:2] == ("closed", 1)


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------


def test_extraction_messages_include_question_context_and_previous_pairs():
    previous = [QAPair("Who founded Acme?", "Jo Park")]
    messages = extraction_messages("Where is Acme based?", "Acme moved to Tromso in 2004.", previous, max_pairs=5)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    user = messages[-1]["content"]
    assert "Where is Acme based?" in user
    assert "Acme moved to Tromso in 2004." in user
    assert '{"instruction": "Who founded Acme?", "output": "Jo Park"}' in user
    assert "do not repeat" in user
    assert "up to 5 " in user
    example = json.loads(messages[2]["content"])  # the worked example is a demonstrated assistant turn
    assert example[0] == {"instruction": "What is the name of Quill's iguana?", "output": "Zorbo"}
    assert "Zorbo" in messages[1]["content"]
    assert EXTRACTION_PREFILL == "["


def test_extraction_messages_without_example_or_previous():
    messages = extraction_messages("Q?", "Some text.", examples=False)
    text = "".join(m["content"] for m in messages)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "Zorbo" not in text
    assert "already written" not in text
    assert "up to 8 " in text


def test_extraction_messages_show_only_last_20_previous():
    previous = [QAPair(f"Question {i}?", f"Answer {i}") for i in range(25)]
    user = extraction_messages("Q?", "text", previous)[-1]["content"]
    assert '"Question 4?"' not in user
    assert '"Question 5?"' in user and '"Question 24?"' in user


def test_answer_messages():
    messages = answer_messages("Text:\nAcme moved to Tromso.\n\nQuestion: Where is Acme based?")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"].endswith("Question: Where is Acme based?")


def test_extraction_messages_without_a_question_ask_for_likely_facts():
    user = extraction_messages("", "Acme moved to Tromso.", examples=False)[-1]["content"]
    assert "Question to answer later" not in user
    assert "may ask about later" in user and "Acme moved to Tromso." in user


def test_grounded_keeps_only_answers_found_in_the_text():
    pairs = [QAPair("Where does Maya live?", "Lisbon"), QAPair("When did the bridge open?", "1932"),
             QAPair("Dog?", "biscuit")]
    kept, dropped = grounded(pairs, "Maya: I moved to LISBON.\nMaya: My dog Biscuit is old.")
    assert [(p.instruction, p.output) for p in kept] == [("Where does Maya live?", "Lisbon"), ("Dog?", "biscuit")]
    assert dropped == [{"item": {"instruction": "When did the bridge open?", "output": "1932"},
                        "reason": "answer not in text"}]


def test_parse_with_source_drops_ungrounded_pairs():
    text = '[{"instruction": "Lena\'s cat?", "output": "Mochi"}, {"instruction": "Maya\'s city?", "output": "Lisbon"}]'
    record = parse_qa_pairs(text, source="Maya: I moved to Lisbon.")
    assert pairs(record) == [("Maya's city?", "Lisbon")]
    assert reasons(record) == ["answer not in text"]
    assert parse_qa_pairs(text, source="nothing here").error == "all items dropped"


def test_worked_example_content_occurs_in_no_facts_stream():
    """A small model that copies the example must not pass grounding by accident."""
    from tmem_rl.envs import facts
    from tmem_rl.extraction import _EXAMPLE_PAIRS, _EXAMPLE_TEXT

    pools = [facts.NAMES, facts.CITIES, facts.PET_NAMES, facts.JOBS, facts.PLACES, facts.SPECIES]
    values = {v.casefold() for pool in pools for v in pool}
    words = {w.strip(".:").casefold() for w in _EXAMPLE_TEXT.split()}
    assert not {p.output.casefold() for p in _EXAMPLE_PAIRS} & values
    assert not {"quill", "bex", "zorbo", "glazier", "hammerfest", "iguana"} & values
    assert {"quill", "zorbo", "hammerfest"} <= words
