"""The TMEM episode: G rollouts act in lockstep, write supervision, learn it, and answer.

A stream environment is read:

    for each chunk of the stream:
        working context += chunk
        if tokens(working context) > L_max:
            text  ~ policy(extraction prompt(question, context, pairs so far))   # fast weights live
            pairs = parse(text)                                                  # retried when nothing parses
            fast weights <- T(fast weights, pairs)                               # inner loop, stop-gradient
            working context <- empty
    answer ~ policy(answer prompt(question, working context))                    # base + fast weights
    reward = environment.score(answer)

A tool environment is acted on, one action per turn (format in `tmem_rl.actions`):

    until the agent answers or the environment's turn limit:
        action ~ policy(turn prompt(question, working context))                  # fast weights live
        tool call:  working context += action + the environment's result
        malformed:  working context += action + why it is not one                # counted; the episode goes on
        answer:     reward = environment.score(answer); done
        if tokens(working context) > L_max: extract and absorb, as above
    at the limit: answer ~ policy(answer prompt(question, working context))

`EpisodeConfig.memory` picks what happens at the budget (the baselines keep the same loop): extract and absorb,
drop the context, keep its most recent part, keep it all, or rewrite running notes. `EpisodeConfig.supervision`
picks what the fast weights learn there (the ablations): the written pairs, the working context itself, or notes
written of it. `EpisodeConfig.carry_fast_weights` lets a new episode start from the fast weights the last one
left (continual learning) instead of the base model.

Everything the outer loop needs is recorded in a JSON-serialisable trajectory per rollout: every prompt and
generated segment as token ids, the fast-weight version that was live for each generated segment (its tensors
are kept in `EpisodeBatch.snapshots`), parse records, inner-update losses, reward and timings.
"""

from __future__ import annotations

import json
import numbers
import time
from contextlib import nullcontext
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tmem_rl.actions import ACTION_PREFILL, ANSWER, FORCED_ANSWER, TOOL, closing_tags, format_call, parse_action
from tmem_rl.chat import chat_ids, chat_template_kwargs, left_padded, stop_token_ids, strip_thinking
from tmem_rl.decoding import StaticDecoder
from tmem_rl.envs.base import Action, ActionKind, ContractError, Environment, EpisodeState, Task
from tmem_rl.extraction import (EXTRACTION_PREFILL, PairReader, answer_messages, extraction_messages,
                                parse_qa_pairs, reference_supervision, summary_messages)
from tmem_rl.logprobs import build_rows, completion_logprobs
from tmem_rl.memory.fast_weights import FastWeights, Snapshot
from tmem_rl.memory.inner_loop import PromptFn
from tmem_rl.records import QAPair, Supervision

MEMORY_MODES = ("fast_weights", "none", "window", "full", "summary")
SEGMENT_KINDS = ("extraction", "action", "answer", "summary")
EXTRACTORS = ("policy", "reference")
DECODERS = ("generate", "static")
SUPERVISIONS = ("qa_pairs", "transcript", "summary")
# Rows per teacher-forced pass when an episode records log-probs.
LOGPROB_ROWS = 8
# The fixed request that text supervision ("transcript", "summary") is trained as the answer to.
RECALL_REQUEST = "Recall what you have read so far."


@dataclass
class EpisodeConfig:
    l_max: int = 4096
    """Working-context budget in tokens; exceeding it triggers an extraction action."""
    memory: str = "fast_weights"
    """What happens when the working context exceeds l_max. "fast_weights": extract and absorb, then clear.
    Baselines: "none" drops the context; "window" keeps the most recent whole chunks or turns that fit l_max (one
    longer than l_max keeps its last l_max tokens); "full" keeps it all (no budget); "summary" rewrites running
    notes from it (shown in every later prompt), then clears it."""
    max_pairs: int = 8
    """Pairs asked for per extraction."""
    extractor: str = "policy"
    """"policy": the model writes each extraction. "reference": the environment's reference pairs grounded in the
    window are absorbed instead (`Task.reference_pairs`; nothing is generated): how far the environment's own gold
    supervision gets through these fast weights, the target a warm start imitates."""
    decoder: str = "generate"
    """"generate": `model.generate` with a dynamic KV cache. "static": `tmem_rl.decoding.StaticDecoder`, a static
    KV cache and fixed-shape decode steps, replayed as CUDA graphs on a GPU (the same tokens)."""
    max_extraction_tokens: int = 192
    """Generation budget of each extraction action (the written QA pairs)."""
    stop_extractions: bool = True
    """End each extraction once max_pairs pairs are written, a pair repeats an earlier one or the list closes
    (`Segment.stop_reason` says which); False: only at an end token or max_extraction_tokens."""
    max_answer_tokens: int = 32
    """Generation budget of the answer."""
    max_action_tokens: int = 64
    """Generation budget of each action turn in a tool environment (the turn ends at its action's closing tag)."""
    summary_tokens: int = 256
    """Generation budget of each notes rewrite (memory "summary")."""
    extraction_retries: int = 1
    """Extra attempts (sampled) when an extraction yields no usable pair."""
    prefill: bool = True
    """Start each extraction with "[" so the model continues a JSON list, and each action with "<" so that it
    continues a tag (tool environments)."""
    examples: bool = True
    """Show one worked example in the extraction prompt, and the environment's worked episode
    (`Environment.example_turns`) before each action turn."""
    grounding: bool = True
    """Drop extracted pairs whose answer does not occur in the text that was read."""
    do_sample: bool = False
    """Sample every generated segment (the outer loop's rollouts); False: greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature (also the temperature every recorded log-prob is taken at)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0: all)."""
    top_k: int = 0
    """0: no top-k filtering."""
    retry_temperature: float = 0.7
    """Temperature of retries, so that a greedy policy does not repeat a failed extraction verbatim."""
    record_logprobs: bool = False
    """Store each generated token's log-prob (teacher-forced, same fast weights) for the outer loop."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Passed to the chat template for extraction prompts, answer prompts and the inner loop's pairs alike. None:
    the template's defaults, except that a template with a thinking switch (Qwen3) gets enable_thinking=False."""
    seed: int = 0
    """Seeds the runner's own sampling generator at the start of every episode (the global RNG is left alone)."""
    supervision: str = "qa_pairs"
    """What the inner loop learns at each extraction point (memory "fast_weights"). "qa_pairs": the pairs the
    policy writes (TMEM). Ablations, with the same inner-loop settings: "transcript": the working context itself;
    "summary": notes the model writes of it (summary_tokens). Text is cut into pieces that fit
    inner_loop.max_pair_tokens, each learned as the answer to one fixed recall request."""
    carry_fast_weights: bool = False
    """Continual learning: a new episode keeps each rollout slot's fast weights from the episode before instead of
    starting from the base model (`EpisodeRunner.reset_fast_weights` clears them when asked)."""

    def __post_init__(self):
        if self.supervision not in SUPERVISIONS:
            raise ValueError(f"EpisodeConfig.supervision={self.supervision!r}: expected one of {SUPERVISIONS}")
        if self.supervision != "qa_pairs" and self.extractor != "policy":
            raise ValueError(f"EpisodeConfig.supervision={self.supervision!r} learns text, not pairs: extractor="
                             f"{self.extractor!r} does not apply")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"EpisodeConfig.memory={self.memory!r}: expected one of {MEMORY_MODES}")
        for name in ("max_extraction_tokens", "max_answer_tokens", "max_action_tokens", "summary_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EpisodeConfig.{name}={getattr(self, name)}: expected a positive token budget")
        if self.l_max < 1:
            raise ValueError(f"EpisodeConfig.l_max={self.l_max}: expected a positive token budget")
        if self.max_pairs < 1:
            raise ValueError(f"EpisodeConfig.max_pairs={self.max_pairs}: expected at least 1 pair per extraction")
        if self.decoder not in DECODERS:
            raise ValueError(f"EpisodeConfig.decoder={self.decoder!r}: expected one of {DECODERS}")
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"EpisodeConfig.extractor={self.extractor!r}: expected one of {EXTRACTORS}")


@dataclass
class Segment:
    """One generated stretch of tokens and the prompt it continued."""

    kind: str  # one of SEGMENT_KINDS; "action": a tool call or a malformed action
    chunk_index: int  # where in the episode: the last chunk read (streams) or the turn (tool environments)
    attempt: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    fast_weight_version: int  # number of absorbs into this rollout before generation; 0 = base model
    snapshot: str | None  # key into EpisodeBatch.snapshots; None = base model
    temperature: float  # the temperature the tokens were sampled at: every log-prob of them is taken at it
    logprobs: list[float] | None = None  # per completion token, when EpisodeConfig.record_logprobs
    stop_reason: str | None = None  # extractions: why generation ended, one of extraction.STOP_REASONS
    question: int = 0  # answers: which of the task's questions (an index into Task.asked()) this one answers


@dataclass
class AnsweredQuestion:
    """One question of an episode (an item of `Task.asked()`), answered and scored."""

    question_id: str
    question: str
    answers: list[str]
    prediction: str
    reward: float
    metrics: dict[str, float]
    category: Any = None


@dataclass
class Trajectory:
    rollout: int
    task_id: str
    question: str
    answers: list[str]
    segments: list[Segment] = field(default_factory=list)
    extractions: list[dict[str, Any]] = field(default_factory=list)
    prediction: str = ""
    """The answer (of a task that asks several questions: the first one's; all are in `answered`)."""
    reward: float = 0.0
    """The episode's return: the answer's score (the mean over the questions asked) plus `shaping_reward`."""
    answered: list[AnsweredQuestion] = field(default_factory=list)
    """Every question the episode asked, in order, with its prediction and scores."""
    shaping_reward: float = 0.0
    """Rewards the environment gave before the answer (its `step` on extraction and tool actions; 0 unless it
    shapes them)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The environment's metrics of the answer (the mean of each over the questions asked)."""
    timings: dict[str, float] = field(default_factory=dict)
    turns: int = 0
    """Actions taken (tool environments): tool calls, malformed actions and the answer."""
    tool_calls: int = 0
    forced_answer: bool = False
    """The turn limit ended the episode, and the answer was asked for."""
    actions: list[dict[str, Any]] = field(default_factory=list)
    """One record per action turn: turn, kind (tool | answer | malformed | forced_answer), tool, argument, error."""
    malformed_actions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpisodeBatch:
    trajectories: list[Trajectory]
    snapshots: dict[str, Snapshot]  # "rollout/version" -> that rollout's fast weights at that version

    def to_dict(self) -> dict[str, Any]:
        return {"trajectories": [t.to_dict() for t in self.trajectories]}

    def save(self, path: str | Path) -> None:
        """Trajectories as JSON plus the fast-weight snapshots as safetensors, in one folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "trajectories.json").write_text(json.dumps(self.to_dict()))
        flat = {f"{key}|{name}": t.contiguous() for key, snap in self.snapshots.items() for name, t in snap.items()}
        save_file(flat, str(path / "snapshots.safetensors"))

    @classmethod
    def load(cls, path: str | Path) -> "EpisodeBatch":
        path = Path(path)
        data = json.loads((path / "trajectories.json").read_text())
        trajectories = []
        for t in data["trajectories"]:
            segments = [Segment(**s) for s in t.pop("segments")]
            answered = [AnsweredQuestion(**a) for a in t.pop("answered", [])]
            trajectories.append(Trajectory(segments=segments, answered=answered, **t))
        snapshots: dict[str, Snapshot] = {}
        for flat_key, tensor in load_file(str(path / "snapshots.safetensors")).items():
            key, name = flat_key.split("|", 1)
            snapshots.setdefault(key, {})[name] = tensor
        return cls(trajectories, snapshots)


@dataclass
class Generated:
    text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    seconds: float  # wall time of the batch that generated it
    logprobs: list[float] | None = None


@dataclass
class Episode:
    """The state of G rollouts in lockstep: after `read`, what answering (and evaluation protocols) need next;
    after `act`, the finished episodes."""

    states: list[EpisodeState]
    trajectories: list[Trajectory]
    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    context: list[list[str]] = field(default_factory=list)  # working context: chunks read, or turns taken
    context_tokens: list[int] = field(default_factory=list)
    pairs: list[list[QAPair]] = field(default_factory=list)  # every pair each rollout absorbed, in order
    notes: list[str] = field(default_factory=list)  # memory "summary": each rollout's running notes
    acting: bool = False  # a tool environment's episode (positions are turns, not chunks)

    def context_text(self, g: int) -> str:
        """What rollout g's prompts show of its memory in text: its notes (memory "summary") and working context."""
        text = "\n".join(self.context[g])
        if self.notes and self.notes[g]:
            return f"Notes:\n{self.notes[g]}" + (f"\n\n{text}" if text else "")
        return text


class EpisodeRunner:
    def __init__(self, model, tokenizer, fast: FastWeights | None, config: EpisodeConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.fast = fast
        self.config = config or EpisodeConfig()
        if self.config.memory == "fast_weights" and fast is None:
            raise ValueError("memory='fast_weights' needs a FastWeights object")
        self.chat_kwargs = chat_template_kwargs(tokenizer, self.config.chat_template_kwargs)
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.generator = torch.Generator(device=self.device)
        self.generation_calls = 0
        # It keeps KV caches and graphs between calls; built here so that an unsupported model fails at once.
        self.static_decoder = StaticDecoder(model, fast) if self.config.decoder == "static" else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def run(self, env: Environment, tasks: list[Task]) -> EpisodeBatch:
        """Run one rollout per task (repeat a task G times for a GRPO group), all in lockstep."""
        started = time.perf_counter()
        if env.tools:
            episode = self.act(env, tasks)
        else:
            episode = self.read(env, tasks)
            self._answer(env, episode)
        total = time.perf_counter() - started
        for traj in episode.trajectories:
            traj.timings["episode"] = total
        return EpisodeBatch(episode.trajectories, episode.snapshots)

    def read(self, env: Environment, tasks: list[Task], episode: "Episode | None" = None) -> "Episode":
        """Read every rollout's stream to its end, extracting and absorbing whenever the budget is exceeded.

        `episode`: an episode this runner read before, to go on with these tasks' chunks as if they followed its
        streams. Its fast weights (slot g for rollout g, as the last read left them), working context, pairs,
        trajectories and snapshots carry on, and the sampling generator is not reseeded; only the environment
        states are new. Without it a new episode starts from the base model.
        """
        ep = self._begin(env, tasks, episode)
        n = len(tasks)
        reading = list(range(n))
        while reading:
            for g in list(reading):
                observation = env.step(ep.states[g], Action(ActionKind.READ)).observation
                if observation.kind == "end":
                    reading.remove(g)
                    continue
                ep.context[g].append(observation.text)
                ep.context_tokens[g] += self._count_tokens(observation.text)
            self._enforce_budget(env, reading, ep)
        return ep

    def act(self, env: Environment, tasks: list[Task]) -> "Episode":
        """Run every rollout's tool-use episode to its answer (see the module docstring), in lockstep: each turn
        generates one action per rollout still acting."""
        cfg = self.config
        several = next((t for t in tasks if t.questions), None)
        if several is not None:
            raise ContractError(f"environment {env.name!r} is a tool environment, whose episodes end at one answer; "
                                f"task {several.task_id!r} asks {len(several.questions)} questions")
        ep = self._begin(env, tasks, None)
        closing = closing_tags(env.tools)
        acting = list(range(len(tasks)))
        prefill = ACTION_PREFILL if cfg.prefill else ""
        while acting:
            prompts = [self.prompt_ids(self._turn_messages(env, ep, g), prefill=prefill) for g in acting]
            t0 = time.perf_counter()
            completions = self.generate(prompts, acting, cfg.max_action_tokens, cfg.do_sample, cfg.temperature,
                                        stop_strings=closing)
            completions = [self._through_action(c, closing) for c in completions]
            elapsed = time.perf_counter() - t0
            logprobs = self._logprobs(prompts, completions, acting, cfg.temperature)
            for g, prompt, completion, lp in zip(acting, prompts, completions, logprobs):
                traj = ep.trajectories[g]
                text = self.tokenizer.decode(completion, skip_special_tokens=True)
                action = parse_action(strip_thinking(prefill + text), env.tools)
                self._add_segment(traj, ep.snapshots, kind="answer" if action.kind == ANSWER else "action",
                                  chunk_index=traj.turns, attempt=0, prompt_ids=prompt, completion_ids=completion,
                                  text=text, temperature=cfg.temperature, logprobs=lp)
                traj.timings["generate_action"] = traj.timings.get("generate_action", 0.0) + elapsed
                traj.actions.append({"turn": traj.turns, "kind": action.kind, "tool": action.name,
                                     "argument": action.argument, "error": action.error})
                traj.turns += 1
                if action.kind == ANSWER:
                    self._finish(env, ep, g, action.argument)
                    continue
                if action.kind == TOOL:
                    result = env.step(ep.states[g], Action(ActionKind.TOOL, action.argument, tool=action.name))
                    traj.shaping_reward += result.reward
                    traj.tool_calls += 1
                    piece = format_call(action.name, action.argument, result.observation.text)
                else:
                    traj.malformed_actions += 1
                    piece = f"{(prefill + text).strip()}\n(not an action: {action.error})"
                ep.context[g].append(piece)
                ep.context_tokens[g] += self._count_tokens(piece)
            acting = [g for g in acting if not ep.states[g].done]
            self._enforce_budget(env, acting, ep)
            out_of_turns = [g for g in acting if ep.trajectories[g].turns >= env.max_turns]
            if out_of_turns:
                self._answer(env, ep, out_of_turns)
                acting = [g for g in acting if g not in out_of_turns]
        return ep

    def _begin(self, env: Environment, tasks: list[Task], episode: "Episode | None") -> "Episode":
        """A new episode (fast weights reset, sampling reseeded), or `episode` going on with new environment
        states for `tasks`."""
        n = len(tasks)
        if self.fast is not None and n > self.fast.num_slots:
            raise ValueError(f"{n} rollouts but only {self.fast.num_slots} fast-weight slots")
        states = [env.reset(task)[0] for task in tasks]
        if episode is not None:
            if len(episode.trajectories) != n:
                raise ValueError(f"the episode to continue has {len(episode.trajectories)} rollouts, got {n} tasks")
            episode.states = states
            return episode
        self.reseed()
        if self.fast is not None and not self.config.carry_fast_weights:
            self.fast.reset(range(n))
        ep = Episode(
            states=states,
            trajectories=[Trajectory(g, t.task_id, t.question, list(t.answers)) for g, t in enumerate(tasks)],
        )
        for g in range(n):  # carried fast weights are live from the first segment: keep what they were
            if self._version(g):
                ep.snapshots[self._snapshot_key(g)] = self.fast.snapshot([g])
        for traj in ep.trajectories:
            traj.timings = {"generate_extraction": 0.0, "inner_update": 0.0, "generate_answer": 0.0}
        ep.context = [[] for _ in range(n)]
        ep.context_tokens = [0] * n
        ep.pairs = [[] for _ in range(n)]
        ep.notes = [""] * n
        ep.acting = bool(env.tools)
        return ep

    def _enforce_budget(self, env: Environment, rollouts: list[int], ep: "Episode") -> None:
        """What EpisodeConfig.memory does to the working contexts of `rollouts` that are over l_max."""
        cfg = self.config
        over = [g for g in rollouts if ep.context_tokens[g] > cfg.l_max]
        if not over or cfg.memory == "full":
            return
        if cfg.memory == "fast_weights" and cfg.supervision != "qa_pairs":
            self._absorb(env, over, ep, self._text_supervision(over, ep), prompt_fn=answer_messages)
        elif cfg.memory == "fast_weights":
            self._extract_and_absorb(env, over, ep)
        elif cfg.memory == "summary":
            self._summarize(over, ep)
        for g in over:
            if cfg.memory == "window":
                self._keep_recent(g, ep)
            else:
                ep.context[g], ep.context_tokens[g] = [], 0

    def _keep_recent(self, g: int, ep: "Episode") -> None:
        """Drop the oldest pieces of rollout g's context until it fits l_max; a last piece too long on its own keeps
        its final l_max tokens."""
        budget = self.config.l_max
        pieces, tokens = ep.context[g], [self._count_tokens(p) for p in ep.context[g]]
        while len(pieces) > 1 and sum(tokens) > budget:
            pieces.pop(0)
            tokens.pop(0)
        if tokens and tokens[0] > budget:
            ids = self.tokenizer(pieces[0], add_special_tokens=False)["input_ids"][-budget:]
            pieces[0] = self.tokenizer.decode(ids)
            tokens[0] = self._count_tokens(pieces[0])
        ep.context_tokens[g] = sum(tokens)

    def _summarize(self, rollouts: list[int], ep: "Episode") -> None:
        """Rewrite each rollout's running notes from its notes and working context (memory "summary")."""
        cfg = self.config
        prompts = [self.prompt_ids(summary_messages(ep.states[g].task.question, ep.notes[g],
                                                    "\n".join(ep.context[g]), cfg.summary_tokens))
                   for g in rollouts]
        t0 = time.perf_counter()
        completions = self.generate(prompts, rollouts, cfg.summary_tokens, cfg.do_sample, cfg.temperature)
        elapsed = time.perf_counter() - t0
        logprobs = self._logprobs(prompts, completions, rollouts, cfg.temperature)
        for g, prompt, completion, lp in zip(rollouts, prompts, completions, logprobs):
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
            ep.notes[g] = strip_thinking(text).strip()
            self._add_segment(ep.trajectories[g], ep.snapshots, kind="summary", chunk_index=self._position(ep, g),
                              attempt=0, prompt_ids=prompt, completion_ids=completion, text=text,
                              temperature=cfg.temperature, logprobs=lp)
            timings = ep.trajectories[g].timings
            timings["generate_summary"] = timings.get("generate_summary", 0.0) + elapsed

    def _turn_messages(self, env: Environment, ep: "Episode", g: int) -> list[dict[str, str]]:
        task, traj = ep.states[g].task, ep.trajectories[g]
        user = env.turn_prompt(task, ep.context_text(g), env.max_turns - traj.turns)
        example = env.example_turns() if self.config.examples else []
        return [{"role": "system", "content": env.instructions(task)}, *example, {"role": "user", "content": user}]

    def _through_action(self, completion: list[int], closing: list[str]) -> list[int]:
        """The completion cut just past the first token whose text completes a closing tag, as generation that
        stops at the tag ends (either decoder gives the same tokens). What follows, padding included, was never
        part of the action and gets no log-prob."""
        if not any(tag in self.tokenizer.decode(completion, skip_special_tokens=True) for tag in closing):
            return completion
        for end in range(1, len(completion) + 1):
            text = self.tokenizer.decode(completion[:end], skip_special_tokens=True)
            if any(tag in text for tag in closing):
                return completion[:end]
        return completion

    @staticmethod
    def _position(ep: "Episode", g: int) -> int:
        """Where rollout g is: its last turn in a tool environment, else the last chunk it read."""
        return ep.trajectories[g].turns - 1 if ep.acting else ep.states[g].cursor - 1

    # ---- actions --------------------------------------------------------------------------------------------

    def _extract_and_absorb(self, env: Environment, rollouts: list[int], ep: "Episode") -> None:
        cfg = self.config
        states, context, pairs_so_far, trajectories, snapshots = ep.states, ep.context, ep.pairs, ep.trajectories, ep.snapshots
        supervision = {g: Supervision() for g in rollouts}
        pending = list(rollouts)
        if cfg.extractor == "reference":
            for g in rollouts:
                if not states[g].task.reference_pairs:
                    raise ValueError(f"EpisodeConfig.extractor='reference': task {states[g].task.task_id} of "
                                     f"environment {env.name!r} has no reference_pairs")
                supervision[g].pairs = reference_supervision(states[g].task.reference_pairs, "\n".join(context[g]),
                                                             pairs_so_far[g], cfg.max_pairs)
            pending = []
        for attempt in range(1 + cfg.extraction_retries):
            if not pending:
                break
            prompts = [
                self.prompt_ids(
                    extraction_messages(
                        states[g].task.question, "\n".join(context[g]), pairs_so_far[g], cfg.max_pairs, cfg.examples
                    ),
                    prefill=EXTRACTION_PREFILL if cfg.prefill else "",
                )
                for g in pending
            ]
            t0 = time.perf_counter()
            temperature = cfg.temperature if attempt == 0 else cfg.retry_temperature
            stopping = PairStopping(self.tokenizer, len(pending), cfg.max_pairs, cfg.prefill, self.stop_ids,
                                    stop=cfg.stop_extractions)
            completions = self.generate(prompts, pending, cfg.max_extraction_tokens, cfg.do_sample or attempt > 0,
                                         temperature, stopping=stopping)
            completions = stopping.cut(completions)  # the log-probs are those of the tokens kept
            elapsed = time.perf_counter() - t0
            logprobs = self._logprobs(prompts, completions, pending, temperature)
            for g, prompt, completion, lp, reason in zip(pending, prompts, completions, logprobs, stopping.reasons):
                text = self.tokenizer.decode(completion, skip_special_tokens=True)
                source = "\n".join(context[g]) if cfg.grounding else None
                record = parse_qa_pairs(strip_thinking(text), prefilled=cfg.prefill, source=source)
                # The environment sees every extraction action, so that it can shape rewards on them.
                trajectories[g].shaping_reward += env.step(states[g], Action(ActionKind.EXTRACT, text)).reward
                supervision[g].attempts.append(record)
                supervision[g].pairs = record.pairs
                self._add_segment(trajectories[g], snapshots, kind="extraction", chunk_index=self._position(ep, g),
                                  attempt=attempt, prompt_ids=prompt, completion_ids=completion, text=text,
                                  temperature=temperature, logprobs=lp, stop_reason=reason)
                trajectories[g].timings["generate_extraction"] += elapsed
            pending = [g for g in pending if not supervision[g].pairs]
        self._absorb(env, rollouts, ep, supervision)

    def _text_supervision(self, rollouts: list[int], ep: "Episode") -> dict[int, Supervision]:
        """Supervision ablations: the working context ("transcript") or notes the model writes of it ("summary"),
        cut into pieces that fit the inner loop's max_pair_tokens, each the answer to RECALL_REQUEST."""
        if self.config.supervision == "summary":
            self._summarize(rollouts, ep)  # notes are empty under fast-weight memory: a summary of this context
            texts = {g: ep.notes[g] for g in rollouts}
            for g in rollouts:
                ep.notes[g] = ""  # learned, not shown in later prompts
        else:
            texts = {g: "\n".join(ep.context[g]) for g in rollouts}
        budget = self.fast.config.max_pair_tokens - self._recall_prompt_tokens()
        return {g: Supervision(pairs=[QAPair(RECALL_REQUEST, piece) for piece in self._pieces(texts[g], budget)])
                for g in rollouts}

    def _recall_prompt_tokens(self) -> int:
        """Tokens of the chat-formatted recall request, plus a margin for the answer turn's own markup."""
        return len(self.prompt_ids(answer_messages(RECALL_REQUEST))) + 8

    def _pieces(self, text: str, budget: int) -> list[str]:
        """`text` as consecutive pieces of at most `budget` tokens, cut at line ends where a line fits; a longer
        line is cut at its last space within the budget."""
        if budget < 8:
            raise ValueError(f"inner_loop.max_pair_tokens={self.fast.config.max_pair_tokens} leaves {budget} tokens "
                             "of text after the recall request; raise it")
        pieces, current, used = [], [], 0
        for line in text.split("\n"):
            tokens = self._count_tokens(line)
            if used + tokens > budget and current:
                pieces.append("\n".join(current))
                current, used = [], 0
            while tokens > budget:
                head, line = self._cut(line, budget)
                pieces.append(head)
                tokens = self._count_tokens(line)
            if line.strip():
                current.append(line)
                used += tokens + 1
        if current:
            pieces.append("\n".join(current))
        return [p for p in pieces if p.strip()]

    def _cut(self, line: str, budget: int) -> tuple[str, str]:
        """(head, rest) of a line longer than `budget` tokens: cut at characters, never inside one."""
        offsets = self.tokenizer(line, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for n in range(budget, 0, -1):  # a cut text tokenizes anew, sometimes into more tokens: back off until it fits
            end = offsets[n - 1][1]  # the characters the first n tokens cover
            space = line.rfind(" ", 0, end)
            cut = space if space > 0 else max(end, 1)
            if self._count_tokens(line[:cut]) <= budget:
                break
        return line[:cut], line[cut:].lstrip()

    def _absorb(self, env: Environment, rollouts: list[int], ep: "Episode", supervision: dict[int, Supervision],
                prompt_fn: PromptFn | None = None) -> None:
        """Train each rollout's fast weights on its supervision, and record the extraction point. `prompt_fn`
        renders each pair's question (default: the environment's answer prompt, the shape it will ask in)."""
        pairs_so_far, trajectories, snapshots = ep.pairs, ep.trajectories, ep.snapshots
        to_absorb = {g: s.pairs for g, s in supervision.items() if s.pairs}
        t0 = time.perf_counter()
        # Pairs are learned in the shape in which the environment will ask its question.
        pair_prompt = prompt_fn or (lambda q: answer_messages(env.answer_prompt(q, "")))
        stats = (self.fast.absorb(self.tokenizer, to_absorb, prompt_fn=pair_prompt,
                                  chat_template_kwargs=self.chat_kwargs) if to_absorb else {})
        elapsed = time.perf_counter() - t0
        for g in rollouts:
            absorbed = g in stats and stats[g]["num_pairs"] > 0 and not stats[g].get("rolled_back")
            if absorbed:  # a rolled-back absorb leaves no trace in the fast weights, nor in the prompt
                pairs_so_far[g].extend(supervision[g].pairs)
            trajectories[g].timings["inner_update"] += elapsed if g in stats else 0.0
            trajectories[g].extractions.append(
                {
                    "chunk_index": self._position(ep, g),
                    "supervision_kind": self.config.supervision,
                    "supervision": supervision[g].to_dict(),
                    "inner_update": stats.get(g),
                    "fast_weight_version": self.fast.versions[g],
                }
            )
            if absorbed:
                snapshots[self._snapshot_key(g)] = self.fast.snapshot([g])

    def _answer(self, env: Environment, ep: "Episode", rollouts: list[int] | None = None) -> None:
        """Ask `rollouts` (default: all) every question of their tasks with the environment's answer prompt, in one
        batch, each rollout under its own fast weights, and score the answers."""
        rollouts = list(range(len(ep.states))) if rollouts is None else rollouts
        rows = [(g, i, asked) for g in rollouts for i, asked in enumerate(ep.states[g].task.asked())]
        answers = self.answer(env, [g for g, _, _ in rows], [asked for _, _, asked in rows],
                              [ep.context_text(g) for g, _, _ in rows])
        for (g, i, _), out in zip(rows, answers):
            traj = ep.trajectories[g]
            position = traj.turns if ep.acting else ep.states[g].cursor
            self._add_segment(traj, ep.snapshots, kind="answer", chunk_index=position, attempt=0,
                              prompt_ids=out.prompt_ids, completion_ids=out.completion_ids, text=out.text,
                              temperature=self.config.temperature, logprobs=out.logprobs, question=i)
            if ep.acting:  # the turn limit ended the episode: this answer was asked for
                traj.forced_answer = True
                traj.actions.append({"turn": traj.turns, "kind": FORCED_ANSWER, "tool": "", "argument": out.text,
                                     "error": ""})
            if i == 0:  # one batch answered all of a rollout's questions
                traj.timings["generate_answer"] += out.seconds
            self._finish(env, ep, g, out.text, question=i)

    def _finish(self, env: Environment, ep: "Episode", g: int, prediction: str, question: int = 0) -> None:
        """Rollout g answers one of its task's questions, which the environment scores; after the last one the
        episode is over, its reward the mean over the questions."""
        traj, task = ep.trajectories[g], ep.states[g].task
        asked = task.asked()
        result = env.step(ep.states[g], Action(ActionKind.ANSWER, prediction, question=question))
        traj.answered.append(AnsweredQuestion(
            question_id=str(asked[question].question_id),
            question=asked[question].question, answers=list(asked[question].answers), prediction=prediction,
            reward=float(result.reward), metrics=dict(result.info), category=asked[question].metadata.get("category")))
        if len(traj.answered) < len(asked):
            return
        answered = traj.answered
        traj.prediction = answered[0].prediction
        traj.reward = sum(a.reward for a in answered) / len(answered) + traj.shaping_reward
        if len(answered) == 1:
            traj.metrics = dict(result.info)
            return
        shared = [k for k, v in answered[0].metrics.items()
                  if all(isinstance(a.metrics.get(k), numbers.Real) for a in answered)]
        traj.metrics = {k: sum(a.metrics[k] for a in answered) / len(answered) for k in shared}

    def answer(self, env: Environment, slots: list[int], tasks: list[Task], contexts: list[str]) -> list["Generated"]:
        """Answer each task's question in one batch, row i under fast-weight slot slots[i] with contexts[i] in the
        prompt."""
        cfg = self.config
        prompts = [
            self.prompt_ids(answer_messages(env.answer_prompt(task.question, context, task)))
            for task, context in zip(tasks, contexts)
        ]
        t0 = time.perf_counter()
        completions = self.generate(prompts, slots, cfg.max_answer_tokens, cfg.do_sample, cfg.temperature)
        elapsed = time.perf_counter() - t0
        logprobs = self._logprobs(prompts, completions, slots, cfg.temperature)
        return [
            Generated(strip_thinking(self.tokenizer.decode(c, skip_special_tokens=True)).strip(), p, c, elapsed, lp)
            for p, c, lp in zip(prompts, completions, logprobs)
        ]

    # ---- helpers --------------------------------------------------------------------------------------------

    def reset_fast_weights(self, slots: list[int] | None = None) -> None:
        """Forget what the fast weights of these slots (all by default) absorbed: with carry_fast_weights, the
        next episode starts from the base model."""
        if self.fast is not None:
            self.fast.reset(slots)

    def reseed(self) -> None:
        """Restart sampling from EpisodeConfig.seed (every episode does; so does each batch of an evaluation
        method that answers without reading): the noise of a generation call depends on the seed and on how many
        calls came before it since."""
        self.generation_calls = 0

    def _sampling_generator(self) -> torch.Generator:
        if self.generator.device != self.device:  # the model moved since the runner was built
            self.generator = torch.Generator(device=self.device)
        return self.generator

    def _version(self, g: int) -> int:
        return self.fast.versions[g] if self.fast is not None and self.config.memory == "fast_weights" else 0

    def _snapshot_key(self, g: int) -> str:
        return f"{g}/{self._version(g)}"

    def _add_segment(self, traj: Trajectory, snapshots, **fields) -> None:
        """Append a generated segment, stamped with the fast-weight version live for its rollout right now."""
        version = self._version(traj.rollout)
        snapshot = self._snapshot_key(traj.rollout) if version else None
        assert snapshot is None or snapshot in snapshots, "a live version must have a snapshot"
        traj.segments.append(Segment(fast_weight_version=version, snapshot=snapshot, **fields))

    @torch.no_grad()
    def _logprobs(self, prompts, completions, slots, temperature) -> list[list[float] | None]:
        """Teacher-forced log-probs of what was just generated, under the same fast weights (outer-loop input)."""
        if not self.config.record_logprobs:
            return [None] * len(prompts)
        if self.config.memory != "fast_weights":
            slots = [-1] * len(slots)
        out = []
        for start in range(0, len(prompts), LOGPROB_ROWS):  # the pass's memory is that of its rows' logits
            part = slice(start, start + LOGPROB_ROWS)
            rows = build_rows(prompts[part], completions[part], [temperature] * len(prompts[part]), slots[part],
                              self.tokenizer.pad_token_id, self.device)
            logp = completion_logprobs(self.model, self.fast, rows)
            out += [logp[i, : len(c)].tolist() for i, c in enumerate(completions[part])]
        return out

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: list[dict[str, str]], prefill: str = "") -> list[int]:
        return chat_ids(self.tokenizer, messages, self.chat_kwargs, generation_prompt=True, suffix=prefill)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], slots: list[int], max_new_tokens: int, sample: bool,
                 temperature: float, stop_strings: list[str] | None = None,
                 stopping: StoppingCriteria | None = None) -> list[list[int]]:
        """Batched, KV-cached generation; row i runs under fast-weight slot slots[i] (-1: the base model).

        `stop_strings`: a row may stop once its text holds one (the "generate" decoder), and `stopping` (either
        decoder) once it says so, to save time; the tokens up to the stop are the same either way, and callers cut
        each row there themselves (padding follows it)."""
        pad = self.tokenizer.pad_token_id
        input_ids, attention_mask = left_padded(prompts, pad)
        # Sampling draws from the runner's own generator (Gumbel-max over HF's warped scores, decoded greedily), so
        # an episode is reproducible from EpisodeConfig.seed and the caller's global RNG is never touched.
        processors = LogitsProcessorList([])
        if sample:
            key = counter_seed(self.config.seed, self.generation_calls)
            processors.extend([*self._warpers(temperature),
                               GumbelNoise(self._sampling_generator(), key, input_ids.shape[1])])
        self.generation_calls += 1
        if self.config.memory != "fast_weights":
            slots = [-1] * len(slots)
        if self.config.decoder == "static":
            if self.static_decoder is None:
                self.static_decoder = StaticDecoder(self.model, self.fast)
            new_tokens = self.static_decoder.decode(input_ids, attention_mask, max_new_tokens, self.stop_ids, pad,
                                                    slots, processors, stopping)
        else:
            live = self.fast.use(slots) if self.fast is not None and max(slots) >= 0 else nullcontext()
            with live:
                new_tokens = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=self.stop_ids,
                    do_sample=False, temperature=None, top_p=None, top_k=None,
                    logits_processor=processors,
                    **({"stop_strings": stop_strings, "tokenizer": self.tokenizer} if stop_strings else {}),
                    **({"stopping_criteria": StoppingCriteriaList([stopping])} if stopping else {}),
                )[:, input_ids.shape[1]:]
        completions = []
        for row in new_tokens.tolist():
            end = next((i for i, token in enumerate(row) if token in self.stop_ids), None)
            # Keep the end token: it was generated and carries log-prob.
            completions.append(row if end is None else row[: end + 1])
        return completions

    def _warpers(self, temperature: float) -> list[LogitsProcessor]:
        warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(temperature)]
        if self.config.top_k:
            warpers.append(TopKLogitsWarper(self.config.top_k))
        if self.config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.config.top_p))
        return warpers


def counter_seed(*counters: int) -> int:
    """A 63-bit seed that is a pure function of the counters (splitmix64's mixing, chained)."""
    mask = (1 << 64) - 1
    x = 0
    for counter in counters:
        x = (x + (counter & mask) + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x >> 1


class PairStopping(StoppingCriteria):
    """Stops each row of a batch of extractions once it is done (`PairReader`), as generation stops a row at an
    end token; `cut` then keeps each row's tokens up to its stop and sets its reason in `reasons`.

    Either decoder calls it once per new token with the rows so far, and it reads their last column. Each row's text
    is decoded a few tokens at a time: only the new tokens, after a couple before them for context, a character
    split across tokens waiting for the rest. `stop=False`: it only records why rows ended ("eos" or "length")."""

    def __init__(self, tokenizer, rows: int, max_pairs: int, prefilled: bool, stop_ids: list[int],
                 stop: bool = True):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.stop = stop
        self.readers = [PairReader(max_pairs, prefilled) for _ in range(rows)]
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.decoded = [(0, 0)] * rows  # (start, end): ids[start:end] was decoded last, the context of what follows
        self.reasons: list[str | None] = [None] * rows
        self.kept: list[int | None] = [None] * rows  # tokens each stopped row keeps
        self.settled = [0] * rows  # tokens through the one that completed the row's last new pair

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for row, token in enumerate(input_ids[:, -1].tolist()):
            self._read(row, token)
        return torch.tensor([reason is not None for reason in self.reasons], device=input_ids.device)

    def cut(self, completions: list[list[int]]) -> list[list[int]]:
        """Each row up to where it stopped; a row whose budget ran out is kept whole, with reason "length". Tokens
        the criterion was never shown (a policy that did not generate through it) are read first."""
        kept = []
        for row, completion in enumerate(completions):
            for token in completion[len(self.ids[row]):]:
                self._read(row, token)
            if self.reasons[row] is None:
                self.reasons[row], self.kept[row] = "length", len(completion)
            kept.append(completion[: self.kept[row]])
        return kept

    def _read(self, row: int, token: int) -> None:
        if self.reasons[row] is not None:  # padding after the stop
            return
        ids = self.ids[row]
        ids.append(token)
        if token in self.stop_ids:
            self.reasons[row], self.kept[row] = "eos", len(ids)  # the end token is kept: it carries log-prob
            return
        if not self.stop:
            return
        reader = self.readers[row]
        pairs = reader.pairs
        reason = reader.feed(self._new_text(row))
        if reader.pairs > pairs:
            self.settled[row] = len(ids)
        if reason is not None:
            self.reasons[row] = reason
            # A repeat is cut back to the end of the last new pair, so that the kept text ends where its pairs do
            # (the parser would only drop the repeat as a duplicate).
            self.kept[row] = self.settled[row] if reason == "repeat" else len(ids)

    def _new_text(self, row: int) -> str:
        ids = self.ids[row]
        start, end = self.decoded[row]
        before = self.tokenizer.decode(ids[start:end], skip_special_tokens=True)
        text = self.tokenizer.decode(ids[start:], skip_special_tokens=True)
        # A trailing U+FFFD is a character whose bytes are still to come (a UTF-8 character has at most 4).
        if len(text) <= len(before) or (text.endswith("\ufffd") and len(ids) - end < 4):
            return ""
        self.decoded[row] = (end, len(ids))
        return text[len(before):]


class GumbelNoise(LogitsProcessor):
    """Adds Gumbel noise: the argmax of the result is a sample from softmax(scores).

    The noise of each position is drawn afresh from a seed that depends only on `key` (the runner's seed and
    which generation call of the episode this is) and the position in the completion: so the tokens do not depend
    on the decoder, on how often it checks for stops, or on how many steps any earlier call ran."""

    def __init__(self, generator: torch.Generator, key: int, prompt_width: int):
        self.generator = generator
        self.key = key
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.generator.manual_seed(counter_seed(self.key, input_ids.shape[1] - self.prompt_width))
        # float64: float32 uniforms step by 2^-24 near 1, which would misplace the noise that lets rare tokens win.
        uniform = torch.rand(scores.shape, generator=self.generator, device=scores.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
        return scores.float() + gumbel.float()
