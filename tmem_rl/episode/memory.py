"""What a rollout's working context becomes when it exceeds L_max: one class per `EpisodeConfig.memory`.

The TMEM action is `FastWeightMemory`: the policy writes QA pairs from the context (retried when nothing parses),
the inner loop trains the rollout's fast weights on them, and the context is cleared. The baselines keep the same
loop and differ only here: drop the context, keep its most recent part, keep it all, or rewrite running notes.
"""

from __future__ import annotations

import time

from tmem_rl.chat import strip_thinking
from tmem_rl.envs.base import Action, ActionKind, Environment
from tmem_rl.episode.config import RECALL_REQUEST
from tmem_rl.episode.context import Episode, WorkingContext
from tmem_rl.episode.records import Extraction
from tmem_rl.episode.sampler import PairStopping
from tmem_rl.extraction import (EXTRACTION_PREFILL, answer_messages, extraction_messages, parse_qa_pairs,
                                reference_supervision, summary_messages)
from tmem_rl.memory.inner_loop import PromptFn
from tmem_rl.records import QAPair, Supervision
from tmem_rl.retrieval import bm25_top_k


class Memory:
    """memory "none": an over-budget working context is dropped. Each mode acts through the `EpisodeRunner` that
    holds it: its sampler, fast weights and segment records."""

    def __init__(self, runner):
        self.runner = runner

    @property
    def config(self):
        return self.runner.config

    def version(self, rollout: int) -> int:
        """How many absorbs the rollout's live fast weights hold (0: the base model answers)."""
        return 0

    def over_budget(self, env: Environment, episode: Episode, over: list[WorkingContext]) -> None:
        for ctx in over:
            ctx.clear()


class FullContext(Memory):
    """memory "full": no budget; everything read stays in the prompt."""

    def over_budget(self, env, episode, over) -> None:
        pass


class Window(Memory):
    """memory "window": keep the most recent whole chunks or turns that fit l_max."""

    def over_budget(self, env, episode, over) -> None:
        for ctx in over:
            ctx.keep_recent(self.config.budget(env), self.runner.tokenizer)


class Summary(Memory):
    """memory "summary": rewrite running notes from the notes and the context (shown in every later prompt), then
    clear the context."""

    def over_budget(self, env, episode, over) -> None:
        summarize(self.runner, episode, over)
        super().over_budget(env, episode, over)


def summarize(runner, episode: Episode, rollouts: list[WorkingContext]) -> None:
    """Rewrite each rollout's running notes from its notes and working context."""
    cfg, sampler = runner.config, runner.sampler
    prompts = [sampler.prompt_ids(summary_messages(ctx.task.question, ctx.notes, ctx.window(), cfg.summary_tokens))
               for ctx in rollouts]
    outs = sampler.sample(prompts, [ctx.rollout for ctx in rollouts], cfg.summary_tokens, cfg.temperature)
    for ctx, out in zip(rollouts, outs):
        ctx.notes = strip_thinking(out.text).strip()
        runner.record(episode, ctx, out, "summary", cfg.temperature, "generate_summary")


class FastWeightMemory(Memory):
    """memory "fast_weights": extract supervision from the context, absorb it into the rollout's fast weights,
    clear the context."""

    def version(self, rollout: int) -> int:
        return self.runner.fast.versions[rollout]

    def over_budget(self, env, episode, over) -> None:
        if self.config.supervision == "qa_pairs":
            self.absorb(env, episode, over, self.extract(env, episode, over))
        else:
            self.absorb(env, episode, over, self.text_supervision(episode, over), prompt_fn=answer_messages)
        super().over_budget(env, episode, over)

    def extract(self, env: Environment, episode: Episode, rollouts: list[WorkingContext]) -> dict[int, Supervision]:
        """Each rollout's pairs: written by the policy (a sampled retry for those where nothing parsed), or the
        environment's reference pairs grounded in the window (EpisodeConfig.extractor "reference")."""
        cfg = self.config
        supervision = {ctx.rollout: Supervision() for ctx in rollouts}
        if cfg.extractor == "reference":
            for ctx in rollouts:
                if not ctx.task.reference_pairs:
                    raise ValueError(f"EpisodeConfig.extractor='reference': task {ctx.task.task_id} of "
                                     f"environment {env.name!r} has no reference_pairs")
                supervision[ctx.rollout].pairs = reference_supervision(ctx.task.reference_pairs, ctx.window(),
                                                                       ctx.pairs, cfg.max_pairs)
            return supervision
        pending = list(rollouts)
        for attempt in range(1 + cfg.extraction_retries):
            if not pending:
                break
            self._write_pairs(env, episode, pending, attempt, supervision)
            pending = [ctx for ctx in pending if not supervision[ctx.rollout].pairs]
        return supervision

    def _write_pairs(self, env: Environment, episode: Episode, rollouts: list[WorkingContext], attempt: int,
                     supervision: dict[int, Supervision]) -> None:
        """One extraction action per rollout, parsed into pairs (grounded in the window when asked)."""
        cfg, sampler = self.config, self.runner.sampler
        prefill = EXTRACTION_PREFILL if cfg.prefill else ""
        prompts = [sampler.prompt_ids(extraction_messages(ctx.task.question, ctx.window(), ctx.pairs, cfg.max_pairs,
                                                          cfg.examples), prefill=prefill)
                   for ctx in rollouts]
        temperature = cfg.temperature if attempt == 0 else cfg.retry_temperature
        stopping = PairStopping(self.runner.tokenizer, len(rollouts), cfg.max_pairs, cfg.prefill, sampler.stop_ids,
                                stop=cfg.stop_extractions)
        # The log-probs are those of the tokens kept.
        outs = sampler.sample(prompts, [ctx.rollout for ctx in rollouts], cfg.max_extraction_tokens, temperature,
                              sampled=cfg.do_sample or attempt > 0, stopping=stopping, cut=stopping.cut)
        for ctx, out, reason in zip(rollouts, outs, stopping.reasons):
            source = ctx.window() if cfg.grounding else None
            record = parse_qa_pairs(strip_thinking(out.text), prefilled=cfg.prefill, source=source)
            # The environment sees every extraction action, so that it can shape rewards on them.
            ctx.trajectory.shaping_reward += env.step(ctx.state, Action(ActionKind.EXTRACT, out.text)).reward
            supervision[ctx.rollout].attempts.append(record)
            supervision[ctx.rollout].pairs = record.pairs
            self.runner.record(episode, ctx, out, "extraction", temperature, "generate_extraction", attempt=attempt,
                               stop_reason=reason)

    def text_supervision(self, episode: Episode, rollouts: list[WorkingContext]) -> dict[int, Supervision]:
        """Supervision ablations: the working context ("transcript") or notes the model writes of it ("summary"),
        cut into pieces that fit the inner loop's max_pair_tokens, each the answer to RECALL_REQUEST."""
        if self.config.supervision == "summary":
            summarize(self.runner, episode, rollouts)  # notes are empty under fast-weight memory: this context's
            texts = {ctx.rollout: ctx.notes for ctx in rollouts}
            for ctx in rollouts:
                ctx.notes = ""  # learned, not shown in later prompts
        else:
            texts = {ctx.rollout: ctx.window() for ctx in rollouts}
        sampler = self.runner.sampler
        # The recall request's chat-formatted tokens, plus a margin for the answer turn's own markup.
        budget = (self.runner.fast.config.max_pair_tokens
                  - len(sampler.prompt_ids(answer_messages(RECALL_REQUEST))) - 8)
        if budget < 8:
            raise ValueError(f"inner_loop.max_pair_tokens={self.runner.fast.config.max_pair_tokens} leaves {budget} "
                             "tokens of text after the recall request; raise it")
        return {g: Supervision(pairs=[QAPair(RECALL_REQUEST, piece) for piece in text_pieces(text, budget, sampler)])
                for g, text in texts.items()}

    def absorb(self, env: Environment, episode: Episode, rollouts: list[WorkingContext],
               supervision: dict[int, Supervision], prompt_fn: PromptFn | None = None) -> None:
        """Train each rollout's fast weights on its supervision, and record the extraction point. `prompt_fn`
        renders each pair's question (default: the environment's answer prompt, the shape it will ask in)."""
        runner = self.runner
        to_absorb = {g: s.pairs for g, s in supervision.items() if s.pairs}
        pair_prompt = prompt_fn or (lambda q: answer_messages(env.answer_prompt(q, "")))
        t0 = time.perf_counter()
        stats = (runner.fast.absorb(runner.tokenizer, to_absorb, prompt_fn=pair_prompt,
                                    chat_template_kwargs=runner.sampler.chat_kwargs) if to_absorb else {})
        elapsed = time.perf_counter() - t0
        for ctx in rollouts:
            g, traj = ctx.rollout, ctx.trajectory
            point = Extraction(ctx.position, self.config.supervision, supervision[g], stats.get(g),
                               runner.fast.versions[g])
            traj.extractions.append(point)
            traj.timings["inner_update"] += elapsed if g in stats else 0.0
            if point.absorbed:  # a rolled-back absorb leaves no trace in the fast weights, nor in the prompt
                ctx.pairs.extend(supervision[g].pairs)
                episode.snapshots[runner.snapshot_key(g)] = runner.fast.snapshot([g])
                if self.config.explicit_notes:
                    ctx.notes = pair_notes(ctx.pairs, ctx.task.question, self.config.explicit_notes)


def pair_notes(pairs: list[QAPair], question: str, k: int) -> str:
    """The k absorbed pairs that best match `question` (BM25), one per line, in the order they were written: the
    explicit memory of TMEM + explicit notes."""
    top = bm25_top_k([f"{p.instruction} {p.output}" for p in pairs], question, k)
    return "\n".join(f"- {pairs[i].instruction} {pairs[i].output}" for i in top)


def text_pieces(text: str, budget: int, sampler) -> list[str]:
    """`text` as consecutive pieces of at most `budget` tokens, cut at line ends where a line fits; a longer line is
    cut at its last space within the budget."""
    pieces, current, used = [], [], 0
    for line in text.split("\n"):
        tokens = sampler.count_tokens(line)
        if used + tokens > budget and current:
            pieces.append("\n".join(current))
            current, used = [], 0
        while tokens > budget:
            head, line = _cut_line(line, budget, sampler)
            pieces.append(head)
            tokens = sampler.count_tokens(line)
        if line.strip():
            current.append(line)
            used += tokens + 1
    if current:
        pieces.append("\n".join(current))
    return [p for p in pieces if p.strip()]


def _cut_line(line: str, budget: int, sampler) -> tuple[str, str]:
    """(head, rest) of a line longer than `budget` tokens: cut at characters, never inside one."""
    offsets = sampler.tokenizer(line, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for n in range(budget, 0, -1):  # a cut text tokenizes anew, sometimes into more tokens: back off until it fits
        end = offsets[n - 1][1]  # the characters the first n tokens cover
        space = line.rfind(" ", 0, end)
        cut = space if space > 0 else max(end, 1)
        if sampler.count_tokens(line[:cut]) <= budget:
            break
    return line[:cut], line[cut:].lstrip()


MEMORIES = {"none": Memory, "full": FullContext, "window": Window, "summary": Summary,
            "fast_weights": FastWeightMemory}
