import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tmem_rl.agent import TMEMAgent, read_agent_settings, write_agent_settings
from tmem_rl.errors import InputError
from tmem_rl.memory import FastWeightConfig
from tmem_rl.models import FIXTURE_TOKENIZER, load_policy, load_tokenizer, tiny_model
from tmem_rl.records import QAPair
from tmem_rl.episode import EpisodeConfig

ROOT = Path(__file__).resolve().parents[1]
FACTS = [
    QAPair("Where does Maya live?", "Lisbon"),
    QAPair("What is Omar's dog called?", "Biscuit"),
    QAPair("What is Ines's job?", "glassblower"),
    QAPair("When does the market open?", "Tuesday"),
]
TEXT_ONE = "Maya: I moved to Lisbon last spring.\nOmar: My dog Biscuit loves the beach."
TEXT_TWO = "Ines: These days I work as a glassblower.\nOmar: The market opens on Tuesday, come along."
# The scripted policy always writes every fact (continuing the prefilled "["); grounding keeps those in the window.
EXTRACTION = " " + ", ".join(json.dumps(p.to_dict()) for p in FACTS) + "]"
FAST = FastWeightConfig(lr=0.05, epochs=2)
TOKENIZER = load_tokenizer(FIXTURE_TOKENIZER)


def scripted(agent: TMEMAgent) -> TMEMAgent:
    """The agent with a policy whose extractions are fixed (answers still come from the model)."""
    real_generate = agent.runner.sampler.generate
    agent.prompts = []

    def generate(prompts, slots, max_new_tokens, sample, temperature, stop_strings=None, stopping=None):
        if max_new_tokens != agent.config.max_extraction_tokens:
            return real_generate(prompts, slots, max_new_tokens, sample, temperature)
        agent.prompts += [agent.tokenizer.decode(p) for p in prompts]
        ids = agent.tokenizer(EXTRACTION, add_special_tokens=False)["input_ids"] + [agent.tokenizer.eos_token_id]
        return [list(ids) for _ in prompts]

    agent.runner.sampler.generate = generate
    return agent


def new_agent(model_and_tokenizer, l_max: int, fast: FastWeightConfig = FAST) -> TMEMAgent:
    model, tokenizer = model_and_tokenizer
    return scripted(TMEMAgent(model, tokenizer, fast, EpisodeConfig(l_max=l_max, max_answer_tokens=6)))


def tokens(text: str) -> int:
    """Tokens the runner counts for a text of short lines read as one string: the sum over its lines."""
    return sum(len(TOKENIZER(line, add_special_tokens=False)["input_ids"]) for line in text.splitlines())


def fast_b(agent: TMEMAgent) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in agent.fast.B.items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any((after[n] - before[n]).abs().max() > 1e-6 for n in before)


def logits(agent: TMEMAgent, fast_weights: bool) -> torch.Tensor:
    ids = agent.tokenizer("Question: Where does Maya live?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        if fast_weights:
            with agent.fast.use([0]):
                return agent.model(input_ids=ids).logits
        return agent.model(input_ids=ids).logits


def test_reading_past_the_budget_absorbs_and_clears_the_context(tiny):
    agent = new_agent(tiny, l_max=tokens(TEXT_ONE) - 1)  # exceeded on the last line only
    before = fast_b(agent)
    report = agent.read(TEXT_ONE)
    assert report.pairs == FACTS[:2] == agent.pairs  # the two facts of this text, nothing ungrounded
    assert len(report.extractions) == 1 and report.extractions[0].inner_update.num_pairs == 2
    assert changed(before, fast_b(agent)) and agent.fast.versions == [1]
    assert agent.context == [] and report.context_tokens == 0 and report.chunks == 2


def test_reading_within_the_budget_only_fills_the_context(tiny):
    agent = new_agent(tiny, l_max=tokens(TEXT_ONE))  # reached, not exceeded
    report = agent.read(TEXT_ONE)
    assert report.pairs == [] and agent.pairs == [] and report.extractions == [] and agent.prompts == []
    assert all(b.abs().max() == 0 for b in agent.fast.B.values()) and agent.fast.versions == [0]
    assert agent.context == TEXT_ONE.splitlines() and report.context_tokens == tokens(TEXT_ONE)


def test_reads_accumulate_fast_weights_and_pairs(tiny):
    agent = new_agent(tiny, l_max=min(tokens(TEXT_ONE), tokens(TEXT_TWO)) - 1)
    agent.read(TEXT_ONE)
    assert agent.fast.versions == [1] and agent.context == []
    after_one = fast_b(agent)
    report = agent.read(TEXT_TWO)
    assert report.pairs == FACTS[2:]
    assert agent.pairs == FACTS  # both reads' pairs, in order
    assert agent.fast.versions == [2] and changed(after_one, fast_b(agent))
    # The second read's extraction prompt lists what the first one wrote.
    assert "Pairs already written" in agent.prompts[-1] and "Lisbon" in agent.prompts[-1]


def test_a_read_continues_where_the_last_one_stopped():
    """Two reads are one stream: the context left by the first is extracted together with the second's."""
    l_max = tokens(TEXT_ONE)  # the first read stays within the budget; the second's first line passes it
    split = new_agent(tiny_model(), l_max=l_max)
    split.read(TEXT_ONE)
    assert split.pairs == [] and split.context == TEXT_ONE.splitlines()
    split.read(TEXT_TWO)
    whole = new_agent(tiny_model(), l_max=l_max)
    whole.read(TEXT_ONE + "\n" + TEXT_TWO)
    assert split.pairs == whole.pairs == FACTS[:3]  # one window: both lines of the first read and one of the second
    assert split.context == whole.context == TEXT_TWO.splitlines()[1:]
    assert split.fast.versions == whole.fast.versions == [1]
    for name, b in whole.fast.B.items():
        torch.testing.assert_close(split.fast.B[name], b, rtol=1e-4, atol=1e-6)


def test_the_question_steers_extraction(tiny):
    agent = new_agent(tiny, l_max=1)
    agent.read(TEXT_ONE.splitlines()[:1], question="Where does Maya live?")
    agent.read(TEXT_ONE.splitlines()[1:])
    with_question, without = (prompt.rsplit("<|im_start|>user", 1)[1] for prompt in agent.prompts)  # last turns
    assert "Question to answer later: Where does Maya live?" in with_question
    assert "Question to answer later" not in without and "someone may ask about later" in without


def test_reset_returns_to_the_base_model(tiny):
    agent = new_agent(tiny, l_max=8)
    base_answer = agent.answer("Where does Maya live?")
    base = logits(agent, fast_weights=False)
    agent.read(TEXT_ONE + "\n" + TEXT_TWO)
    assert agent.pairs and (logits(agent, fast_weights=True) - base).abs().max() > 1e-3
    agent.reset()
    assert agent.pairs == [] and agent.context == [] and agent.fast.versions == [0]
    torch.testing.assert_close(logits(agent, fast_weights=True), base, rtol=1e-5, atol=1e-5)
    assert agent.answer("Where does Maya live?") == base_answer


def test_saved_memory_loads_into_a_fresh_agent(tmp_path):
    agent = new_agent(tiny_model(), l_max=tokens(TEXT_ONE) - 1)
    agent.read(TEXT_ONE + "\n" + TEXT_TWO.splitlines()[0])  # absorbs the first text, keeps one line in context
    assert agent.pairs and agent.context
    question = "Where does Maya live?"
    answer = agent.answer(question)
    agent.save_memory(tmp_path / "memory")

    fresh = new_agent(tiny_model(), l_max=agent.config.l_max)
    no_memory_logits = logits(fresh, fast_weights=True)
    fresh.load_memory(tmp_path / "memory")
    assert fresh.pairs == agent.pairs and fresh.context == agent.context
    assert fresh.fast.versions == agent.fast.versions
    assert fresh.fast.absorbed_answers == agent.fast.absorbed_answers == [[p.output for p in agent.pairs]]
    for name, b in agent.fast.B.items():
        torch.testing.assert_close(fresh.fast.B[name], b)
    assert (logits(fresh, fast_weights=True) - no_memory_logits).abs().max() > 1e-3
    assert fresh.answer(question) == answer
    # Both go on from the same memory alike.
    agent.read(TEXT_TWO.splitlines()[1:])
    fresh.read(TEXT_TWO.splitlines()[1:])
    assert fresh.pairs == agent.pairs == FACTS
    for name, b in agent.fast.B.items():
        torch.testing.assert_close(fresh.fast.B[name], b, rtol=1e-4, atol=1e-6)


def test_memory_from_other_settings_or_another_model_shape_is_an_input_error(tiny, tmp_path):
    agent = new_agent(tiny, l_max=8)
    agent.read(TEXT_ONE)
    agent.save_memory(tmp_path / "memory")
    settings = re.escape(str(tmp_path / "memory" / "fast_weights" / "fast_weights.json"))
    other_rank = new_agent(tiny_model(), l_max=8, fast=FastWeightConfig(rank=4))
    with pytest.raises(InputError, match=f"{settings}.*rank=6 \\(this agent: 4\\)"):
        other_rank.load_memory(tmp_path / "memory")
    other_layers = new_agent(tiny_model(), l_max=8, fast=FastWeightConfig(num_layers=2))
    with pytest.raises(InputError, match=f"{settings}.*num_layers=4"):
        other_layers.load_memory(tmp_path / "memory")
    # Learning settings only govern absorbs still to come.
    new_agent(tiny_model(), l_max=8, fast=FastWeightConfig(lr=0.01)).load_memory(tmp_path / "memory")

    tensors = re.escape(str(tmp_path / "memory" / "fast_weights" / "fast_weights.safetensors"))
    narrower = new_agent(tiny_model(hidden_size=32, intermediate_size=96), l_max=8)
    shape = "another model shape: A.* is \\(6, 64\\), this model's is \\(6, 32\\)"
    with pytest.raises(InputError, match=f"{tensors}.*{shape}"):
        narrower.load_memory(tmp_path / "memory")
    deeper = new_agent(tiny_model(num_layers=6), l_max=8)
    with pytest.raises(InputError, match=f"{tensors}.*another model"):
        deeper.load_memory(tmp_path / "memory")
    with pytest.raises(InputError, match="nowhere/memory.json: cannot read the file"):
        agent.load_memory(tmp_path / "nowhere")
    # A refused memory leaves the agent's own as it was.
    narrower.read(TEXT_ONE)
    pairs, b = narrower.pairs, fast_b(narrower)
    with pytest.raises(InputError):
        narrower.load_memory(tmp_path / "memory")
    assert narrower.pairs == pairs and not changed(b, fast_b(narrower))


def test_agent_settings_round_trip(tmp_path):
    fast = FastWeightConfig(rank=4, lr=1e-3, layers=(-2, -1), max_probe_leak=0.5, extra={"from": "test"})
    episode = EpisodeConfig(l_max=300, max_pairs=5, decoder="static", do_sample=True, temperature=0.8,
                            chat_template_kwargs={"enable_thinking": False}, seed=3)
    path = write_agent_settings(tmp_path, fast, episode, base_model="smollm2-135m-instruct", steps=40)
    assert path == tmp_path / "fast_weights.json"
    written = json.loads(path.read_text())
    assert written["format"] == "tmem_rl.agent/1" and "record_logprobs" not in written["episode"]
    got_fast, got_episode, info = read_agent_settings(tmp_path)
    assert got_fast == fast
    assert got_episode == episode
    assert info == {"base_model": "smollm2-135m-instruct", "steps": 40}
    # Training-only settings are not part of an agent's settings.
    write_agent_settings(tmp_path / "trained", fast, EpisodeConfig(record_logprobs=True, memory="none"))
    _, reading, _ = read_agent_settings(tmp_path / "trained")
    assert reading == EpisodeConfig()
    with pytest.raises(ValueError, match="'episode'"):
        write_agent_settings(tmp_path, fast, episode, episode="mine")


@pytest.mark.parametrize("content, complaint", [
    ("not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"format": "tmem_rl.agent/2"}', "format 'tmem_rl.agent/2'"),
    ('{"format": "tmem_rl.agent/1", "episode": {"l_max": "long"}}', "episode.l_max='long', expected int"),
    ('{"format": "tmem_rl.agent/1", "episode": {"do_sample": 1}}', "episode.do_sample=1, expected bool"),
    ('{"format": "tmem_rl.agent/1", "episode": {"memory": "none"}}', "unknown key episode.memory"),
    ('{"format": "tmem_rl.agent/1", "fast_weights": {"rnak": 4}}', "unknown key fast_weights.rnak"),
    ('{"format": "tmem_rl.agent/1", "fast_weights": {"layers": ["x"]}}',
     "fast_weights.layers=\\['x'\\], expected tuple\\[int, ...\\] \\| None"),
    ('{"format": "tmem_rl.agent/1", "fast_weights": {"rank": 0}}', "FastWeightConfig.rank=0"),
    ('{"format": "tmem_rl.agent/1", "fast_weights": []}', "'fast_weights' must be an object"),
])
def test_bad_agent_settings_are_input_errors(tmp_path, content, complaint):
    (tmp_path / "fast_weights.json").write_text(content)
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "fast_weights.json")) + ".*" + complaint):
        read_agent_settings(tmp_path)


def test_from_pretrained_reads_the_folder_settings_and_overrides(tmp_path):
    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    write_agent_settings(tmp_path, FastWeightConfig(rank=3, lr=0.02), EpisodeConfig(l_max=77, max_pairs=3))
    agent = TMEMAgent.from_pretrained(str(tmp_path), device="cpu", episode={"l_max": 11},
                                      fast_weights={"epochs": 2})
    assert (agent.config.l_max, agent.config.max_pairs) == (11, 3)
    assert (agent.fast.config.rank, agent.fast.config.lr, agent.fast.config.epochs) == (3, 0.02, 2)
    assert agent.config.do_sample is False  # greedy unless the settings say otherwise
    torch.testing.assert_close(agent.model.model.embed_tokens.weight, model.model.embed_tokens.weight)
    replaced = TMEMAgent.from_pretrained(str(tmp_path), device="cpu", episode=EpisodeConfig(l_max=5))
    assert (replaced.config.l_max, replaced.config.max_pairs) == (5, 8)
    with pytest.raises(InputError, match="unknown settings \\['lmax'\\]"):
        TMEMAgent.from_pretrained(str(tmp_path), device="cpu", episode={"lmax": 5})


def test_from_pretrained_merges_an_adapter_into_its_base(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base, _ = load_policy(str(tmp_path / "base"))
    ids = tokenizer("Maya lives in Lisbon.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "export")
    with torch.no_grad():
        adapted_logits = peft_model(input_ids=ids).logits
    agent = TMEMAgent.from_pretrained(str(tmp_path / "export"), device="cpu")
    with torch.no_grad():
        got = agent.model(input_ids=ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(got, adapted_logits, rtol=1e-4, atol=1e-4)

    # An adapter that names no base (as exports of `tiny` runs once did): one line saying so, and the base can be
    # given at load time.
    config_path = tmp_path / "export" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": None}))
    with pytest.raises(InputError, match=re.escape(str(config_path)) + ": names no base model.*base=NAME_OR_FOLDER"):
        TMEMAgent.from_pretrained(str(tmp_path / "export"), device="cpu")
    given = TMEMAgent.from_pretrained(str(tmp_path / "export"), device="cpu", base=str(tmp_path / "base"))
    with torch.no_grad():
        torch.testing.assert_close(given.model(input_ids=ids).logits, adapted_logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="base is for an adapter folder"):
        TMEMAgent.from_pretrained(str(tmp_path / "base"), device="cpu", base="tiny")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_weights_are_one_line_naming_the_file(tmp_path):
    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path / "export")
    tokenizer.save_pretrained(tmp_path / "export")
    agent = TMEMAgent(model, tokenizer, FAST)
    agent.fast.save_init(tmp_path / "export")
    write_agent_settings(tmp_path / "export", FAST, EpisodeConfig())
    agent.save_memory(tmp_path / "memory")
    for path in (tmp_path / "export" / "fast_weights_init.safetensors", tmp_path / "export" / "model.safetensors"):
        whole = path.read_bytes()
        truncate(path)
        with pytest.raises(InputError, match=re.escape(str(path)) + ": not a whole safetensors file.*truncated"):
            TMEMAgent.from_pretrained(str(tmp_path / "export"), device="cpu")
        path.write_bytes(whole)
    memory = tmp_path / "memory" / "fast_weights" / "fast_weights.safetensors"
    truncate(memory)
    with pytest.raises(InputError, match=re.escape(str(memory)) + ": not a whole safetensors file"):
        agent.load_memory(tmp_path / "memory")


def test_save_memory_refuses_a_folder_that_holds_something_unless_told(tmp_path):
    agent = new_agent(tiny_model(), l_max=tokens(TEXT_ONE) - 1)
    agent.read(TEXT_ONE)
    agent.save_memory(tmp_path / "memory")
    agent.read(TEXT_TWO)  # a later state of the memory
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "memory")) + ": already holds another memory.*"
                                         "overwrite=True"):
        agent.save_memory(tmp_path / "memory")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(InputError, match="already holds 1 other file\\(s\\) \\(todo.txt\\)"):
        agent.save_memory(tmp_path / "notes")
    with pytest.raises(InputError, match="a file, expected a folder"):
        agent.save_memory(tmp_path / "notes" / "todo.txt")
    # Told to, it replaces the memory's own files and leaves the rest.
    for folder in (tmp_path / "memory", tmp_path / "notes"):
        agent.save_memory(folder, overwrite=True)
        fresh = new_agent(tiny_model(), l_max=agent.config.l_max)
        fresh.load_memory(folder)
        assert fresh.pairs == agent.pairs == FACTS
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_strings_are_split_into_lines_and_token_windows(tiny):
    model, tokenizer = tiny
    agent = new_agent(tiny, l_max=5)
    long_line = "one two three four five six seven eight nine ten eleven"
    chunks = agent.split(f"first line\n\n   \n{long_line}\nlast")
    assert chunks[0] == "first line" and chunks[-1] == "last"
    pieces = chunks[1:-1]
    assert "".join(pieces) == long_line and len(pieces) > 1
    assert all(len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= 5 for p in pieces)
    report = agent.read(["kept as it is\n\nwith its blank line"])
    assert report.chunks == 1
    with pytest.raises(TypeError):
        agent.read([b"bytes"])


def test_import_tmem_rl_is_light():
    code = ("import sys, tmem_rl; assert 'torch' not in sys.modules and 'tmem_rl.agent' not in sys.modules; "
            "from tmem_rl import TMEMAgent; import tmem_rl.agent as a; assert TMEMAgent is a.TMEMAgent; "
            "assert 'TMEMAgent' in dir(tmem_rl)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        import tmem_rl

        tmem_rl.NoSuchThing


@pytest.mark.slow
def test_docs_example_runs(tmp_path, monkeypatch):
    """The example in docs/agent.md, as written, on the default model."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "agent.md").read_text(), re.DOTALL)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "docs/agent.md", "exec"), namespace)  # its own assert: the loaded memory answers alike
    agent = namespace["agent"]
    assert agent.pairs and agent.fast.versions == [1]
    assert (tmp_path / "maya_memory" / "memory.json").exists()


def test_several_questions_are_answered_in_one_batch_as_each_alone(tiny):
    agent = new_agent(tiny, l_max=tokens(TEXT_ONE) - 1)
    agent.read(TEXT_ONE)
    questions = ["Where does Maya live?", "What is the name of Leo's dog?", "Who is Maya?"]
    calls = []
    original = agent.runner.sampler.generate
    agent.runner.sampler.generate = lambda prompts, *a, **k: calls.append(len(prompts)) or original(prompts, *a, **k)
    together = agent.answer(questions)
    assert calls == [3] and isinstance(together, list) and len(together) == 3
    assert all(isinstance(a, str) for a in together) and isinstance(agent.answer(questions[0]), str)
    with pytest.raises(TypeError, match="list of questions"):
        agent.answer(["Where?", 3])
