"""The TMEM episode: G rollouts read their streams in lockstep, write supervision, learn it, and answer.

    for each chunk of the stream:
        working context += chunk
        if tokens(working context) > L_max:
            text  ~ policy(extraction prompt(question, context, pairs so far))   # fast weights live
            pairs = parse(text)                                                  # retried when nothing parses
            fast weights <- T(fast weights, pairs)                               # inner loop, stop-gradient
            working context <- empty
    answer ~ policy(answer prompt(question, working context))                    # base + fast weights
    reward = environment.score(answer)

Everything the outer loop needs is recorded in a JSON-serialisable trajectory per rollout: every prompt and
generated segment as token ids, the fast-weight version that was live for each generated segment (its tensors
are kept in `EpisodeBatch.snapshots`), parse records, inner-update losses, reward and timings.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tmem_rl.chat import chat_ids, chat_template_kwargs, left_padded, stop_token_ids, strip_thinking
from tmem_rl.decoding import StaticDecoder
from tmem_rl.envs.base import Action, ActionKind, Environment, EpisodeState, Task
from tmem_rl.extraction import (EXTRACTION_PREFILL, answer_messages, extraction_messages, parse_qa_pairs,
                                reference_supervision)
from tmem_rl.logprobs import build_rows, completion_logprobs
from tmem_rl.memory.fast_weights import FastWeights, Snapshot
from tmem_rl.records import QAPair, Supervision

MEMORY_MODES = ("fast_weights", "none")
EXTRACTORS = ("policy", "reference")
DECODERS = ("generate", "static")


@dataclass
class EpisodeConfig:
    l_max: int = 4096
    """Working-context budget in tokens; exceeding it triggers an extraction action."""
    memory: str = "fast_weights"
    """"fast_weights": extract and absorb. "none": the context is simply dropped at the budget (baseline)."""
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
    max_answer_tokens: int = 32
    extraction_retries: int = 1
    """Extra attempts (sampled) when an extraction yields no usable pair."""
    prefill: bool = True
    """Start the extraction answer with "[" so the model continues a JSON list."""
    examples: bool = True
    """Show one worked example in the extraction prompt."""
    grounding: bool = True
    """Drop extracted pairs whose answer does not occur in the text that was read."""
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
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

    def __post_init__(self):
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"EpisodeConfig.memory={self.memory!r}: expected one of {MEMORY_MODES}")
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

    kind: str  # "extraction" | "answer"
    chunk_index: int
    attempt: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    fast_weight_version: int  # number of absorbs into this rollout before generation; 0 = base model
    snapshot: str | None  # key into EpisodeBatch.snapshots; None = base model
    temperature: float  # the temperature the tokens were sampled at: every log-prob of them is taken at it
    logprobs: list[float] | None = None  # per completion token, when EpisodeConfig.record_logprobs


@dataclass
class Trajectory:
    rollout: int
    task_id: str
    question: str
    answers: list[str]
    segments: list[Segment] = field(default_factory=list)
    extractions: list[dict[str, Any]] = field(default_factory=list)
    prediction: str = ""
    reward: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

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
            trajectories.append(Trajectory(segments=segments, **t))
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
    """Rollouts that have read their streams: what answering (and evaluation protocols) need next."""

    states: list[EpisodeState]
    trajectories: list[Trajectory]
    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    context: list[list[str]] = field(default_factory=list)  # working context left at the end of the stream
    context_tokens: list[int] = field(default_factory=list)
    pairs: list[list[QAPair]] = field(default_factory=list)  # every pair each rollout absorbed, in order


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
        # It keeps KV caches and graphs between calls; built here so that an unsupported model fails at once.
        self.static_decoder = StaticDecoder(model, fast) if self.config.decoder == "static" else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def run(self, env: Environment, tasks: list[Task]) -> EpisodeBatch:
        """Run one rollout per task (repeat a task G times for a GRPO group), all in lockstep."""
        started = time.perf_counter()
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
        cfg = self.config
        n = len(tasks)
        if self.fast is not None and n > self.fast.num_slots:
            raise ValueError(f"{n} rollouts but only {self.fast.num_slots} fast-weight slots")
        states = [env.reset(task)[0] for task in tasks]
        if episode is not None:
            if len(episode.trajectories) != n:
                raise ValueError(f"the episode to continue has {len(episode.trajectories)} rollouts, got {n} tasks")
            ep = episode
            ep.states = states
        else:
            self.reseed()
            if self.fast is not None:
                self.fast.reset(range(n))
            ep = Episode(
                states=states,
                trajectories=[Trajectory(g, t.task_id, t.question, list(t.answers)) for g, t in enumerate(tasks)],
            )
            for traj in ep.trajectories:
                traj.timings = {"generate_extraction": 0.0, "inner_update": 0.0, "generate_answer": 0.0}
            ep.context = [[] for _ in range(n)]
            ep.context_tokens = [0] * n
            ep.pairs = [[] for _ in range(n)]
        reading = list(range(n))
        while reading:
            for g in list(reading):
                observation = env.step(ep.states[g], Action(ActionKind.READ)).observation
                if observation.kind == "end":
                    reading.remove(g)
                    continue
                ep.context[g].append(observation.text)
                ep.context_tokens[g] += self._count_tokens(observation.text)
            over_budget = [g for g in reading if ep.context_tokens[g] > cfg.l_max]
            if not over_budget:
                continue
            if cfg.memory == "fast_weights":
                self._extract_and_absorb(env, over_budget, ep)
            for g in over_budget:
                ep.context[g], ep.context_tokens[g] = [], 0
        return ep

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
            completions = self.generate(prompts, pending, cfg.max_extraction_tokens, cfg.do_sample or attempt > 0,
                                         temperature)
            elapsed = time.perf_counter() - t0
            logprobs = self._logprobs(prompts, completions, pending, temperature)
            for g, prompt, completion, lp in zip(pending, prompts, completions, logprobs):
                text = self.tokenizer.decode(completion, skip_special_tokens=True)
                source = "\n".join(context[g]) if cfg.grounding else None
                record = parse_qa_pairs(strip_thinking(text), prefilled=cfg.prefill, source=source)
                supervision[g].attempts.append(record)
                supervision[g].pairs = record.pairs
                self._add_segment(trajectories[g], snapshots, kind="extraction", chunk_index=states[g].cursor - 1,
                                  attempt=attempt, prompt_ids=prompt, completion_ids=completion, text=text,
                                  temperature=temperature, logprobs=lp)
                trajectories[g].timings["generate_extraction"] += elapsed
            pending = [g for g in pending if not supervision[g].pairs]
        to_absorb = {g: s.pairs for g, s in supervision.items() if s.pairs}
        t0 = time.perf_counter()
        # Pairs are learned in the shape in which the environment will ask its question.
        pair_prompt = lambda q: answer_messages(env.answer_prompt(q, ""))  # noqa: E731
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
                    "chunk_index": states[g].cursor - 1,
                    "supervision": supervision[g].to_dict(),
                    "inner_update": stats.get(g),
                    "fast_weight_version": self.fast.versions[g],
                }
            )
            if absorbed:
                snapshots[self._snapshot_key(g)] = self.fast.snapshot([g])

    def _answer(self, env: Environment, ep: "Episode") -> None:
        everyone = list(range(len(ep.states)))
        tasks = [state.task for state in ep.states]
        answers = self.answer(env, everyone, tasks, ["\n".join(c) for c in ep.context])
        for g, out in enumerate(answers):
            traj = ep.trajectories[g]
            self._add_segment(traj, ep.snapshots, kind="answer", chunk_index=ep.states[g].cursor, attempt=0,
                              prompt_ids=out.prompt_ids, completion_ids=out.completion_ids, text=out.text,
                              temperature=self.config.temperature, logprobs=out.logprobs)
            result = env.step(ep.states[g], Action(ActionKind.ANSWER, out.text))
            traj.prediction = out.text
            traj.reward = result.reward
            traj.metrics = dict(result.info)
            traj.timings["generate_answer"] += out.seconds

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

    def reseed(self) -> None:
        """Restart the sampling generator from EpisodeConfig.seed (every episode does; so does each batch of an
        evaluation method that answers without reading)."""
        self._sampling_generator().manual_seed(self.config.seed)

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
        rows = build_rows(prompts, completions, [temperature] * len(prompts), slots, self.tokenizer.pad_token_id,
                          self.device)
        logp = completion_logprobs(self.model, self.fast, rows)
        return [logp[i, : len(c)].tolist() for i, c in enumerate(completions)]

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: list[dict[str, str]], prefill: str = "") -> list[int]:
        return chat_ids(self.tokenizer, messages, self.chat_kwargs, generation_prompt=True, suffix=prefill)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], slots: list[int], max_new_tokens: int, sample: bool,
                 temperature: float) -> list[list[int]]:
        """Batched, KV-cached generation; row i runs under fast-weight slot slots[i] (-1: the base model)."""
        pad = self.tokenizer.pad_token_id
        input_ids, attention_mask = left_padded(prompts, pad)
        # Sampling draws from the runner's own generator (Gumbel-max over HF's warped scores, decoded greedily), so
        # an episode is reproducible from EpisodeConfig.seed and the caller's global RNG is never touched.
        processors = LogitsProcessorList(
            [*self._warpers(temperature), GumbelNoise(self._sampling_generator())] if sample else []
        )
        if self.config.memory != "fast_weights":
            slots = [-1] * len(slots)
        if self.config.decoder == "static":
            if self.static_decoder is None:
                self.static_decoder = StaticDecoder(self.model, self.fast)
            new_tokens = self.static_decoder.decode(input_ids, attention_mask, max_new_tokens, self.stop_ids, pad,
                                                    slots, processors)
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


class GumbelNoise(LogitsProcessor):
    """Adds Gumbel noise from a given generator: the argmax of the result is a sample from softmax(scores)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # float64: float32 uniforms step by 2^-24 near 1, which would misplace the noise that lets rare tokens win.
        uniform = torch.rand(scores.shape, generator=self.generator, device=scores.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
        return scores.float() + gumbel.float()
