"""`EpisodeRunner`: G rollouts read a stream (or act with tools) in lockstep, remember, and answer.

    read:    each chunk joins its rollout's working context; a context over L_max goes to the memory mode
             (`memory.py`; for TMEM: extract pairs, absorb them into the rollout's fast weights, clear)
    act:     one action per rollout and turn: a tool call's result joins the context, an answer ends the episode
    answer:  every question of each task in one batch, each rollout under its own fast weights, then scored
"""

from __future__ import annotations

import time

from tmem_rl.actions import ACTION_PREFILL, ANSWER, FORCED_ANSWER, TOOL, closing_tags, format_call, parse_action
from tmem_rl.chat import strip_thinking
from tmem_rl.envs.base import Action, ActionKind, ContractError, Environment, Task
from tmem_rl.episode.config import EpisodeConfig
from tmem_rl.episode.context import Episode, WorkingContext
from tmem_rl.episode.memory import MEMORIES
from tmem_rl.episode.records import ActionTurn, AnsweredQuestion, EpisodeBatch, Segment, Trajectory
from tmem_rl.episode.sampler import Generated, Sampler, through_closing_tag
from tmem_rl.extraction import answer_messages
from tmem_rl.memory.fast_weights import FastWeights


class EpisodeRunner:
    def __init__(self, model, tokenizer, fast: FastWeights | None, config: EpisodeConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.fast = fast
        config = config or EpisodeConfig()
        if config.memory == "fast_weights" and fast is None:
            raise ValueError("memory='fast_weights' needs a FastWeights object")
        self.sampler = Sampler(model, tokenizer, fast, config)
        self.config = config

    @property
    def config(self) -> EpisodeConfig:
        return self._config

    @config.setter
    def config(self, config: EpisodeConfig) -> None:
        # Evaluation runs several memory methods, and continual runs, through one runner by swapping its settings.
        self._config = self.sampler.config = config
        self.memory = MEMORIES[config.memory](self)

    def run(self, env: Environment, tasks: list[Task]) -> EpisodeBatch:
        """Run one rollout per task (repeat a task G times for a GRPO group), all in lockstep."""
        started = time.perf_counter()
        if env.tools:
            episode = self.act(env, tasks)
        else:
            episode = self.read(env, tasks)
            self._answer(env, episode, episode.rollouts)
        total = time.perf_counter() - started
        for traj in episode.trajectories:
            traj.timings["episode"] = total
        return EpisodeBatch(episode.trajectories, episode.snapshots)

    def read(self, env: Environment, tasks: list[Task], episode: Episode | None = None) -> Episode:
        """Read every rollout's stream to its end, handing each working context over the budget to the memory.

        `episode`: an episode this runner read before, to go on with these tasks' chunks as if they followed its
        streams. Its fast weights (slot g for rollout g, as the last read left them), working contexts, pairs,
        trajectories and snapshots carry on, and the sampling generator is not reseeded; only the environment
        states are new. Without it a new episode starts from the base model.
        """
        episode = self._begin(env, tasks, episode)
        reading = list(episode.rollouts)
        while reading:
            for ctx in list(reading):
                observation = env.step(ctx.state, Action(ActionKind.READ)).observation
                if observation.kind == "end":
                    reading.remove(ctx)
                else:
                    ctx.add(observation.text, self.sampler.count_tokens(observation.text))
            self._enforce_budget(env, episode, reading)
        return episode

    def act(self, env: Environment, tasks: list[Task]) -> Episode:
        """Run every rollout's tool-use episode to its answer, in lockstep: each turn generates one action per
        rollout still acting; the turn limit asks for the answer."""
        several = next((t for t in tasks if t.questions), None)
        if several is not None:
            raise ContractError(f"environment {env.name!r} is a tool environment, whose episodes end at one answer; "
                                f"task {several.task_id!r} asks {len(several.questions)} questions")
        episode = self._begin(env, tasks, None)
        acting = list(episode.rollouts)
        while acting:
            self._turn(env, episode, acting)
            acting = [ctx for ctx in acting if not ctx.state.done]
            self._enforce_budget(env, episode, acting)
            out_of_turns = [ctx for ctx in acting if ctx.trajectory.turns >= env.max_turns]
            if out_of_turns:
                self._answer(env, episode, out_of_turns)
                acting = [ctx for ctx in acting if ctx not in out_of_turns]
        return episode

    def answer(self, env: Environment, slots: list[int], tasks: list[Task], contexts: list[str]) -> list[Generated]:
        """Answer each task's question in one batch, row i under fast-weight slot slots[i] with contexts[i] in the
        prompt."""
        cfg = self.config
        prompts = [self.sampler.prompt_ids(answer_messages(env.answer_prompt(task.question, context, task)))
                   for task, context in zip(tasks, contexts)]
        outs = self.sampler.sample(prompts, slots, cfg.max_answer_tokens, cfg.temperature)
        for out in outs:
            out.text = strip_thinking(out.text).strip()
        return outs

    def reset_fast_weights(self, slots: list[int] | None = None) -> None:
        """Forget what the fast weights of these slots (all by default) absorbed: with carry_fast_weights, the
        next episode starts from the base model."""
        if self.fast is not None:
            self.fast.reset(slots)

    def reseed(self) -> None:
        """Restart sampling from EpisodeConfig.seed (see `Sampler.reseed`)."""
        self.sampler.reseed()

    def snapshot_key(self, rollout: int) -> str:
        return f"{rollout}/{self.memory.version(rollout)}"

    def record(self, episode: Episode, ctx: WorkingContext, out: Generated, kind: str, temperature: float,
               timing: str | None, chunk_index: int | None = None, attempt: int = 0, **fields) -> None:
        """Append a generated segment to the rollout's trajectory, stamped with the fast-weight version live for
        it, and add its batch's wall time to `timing`."""
        traj = ctx.trajectory
        version = self.memory.version(traj.rollout)
        snapshot = self.snapshot_key(traj.rollout) if version else None
        assert snapshot is None or snapshot in episode.snapshots, "a live version must have a snapshot"
        traj.segments.append(Segment(
            kind=kind, chunk_index=ctx.position if chunk_index is None else chunk_index, attempt=attempt,
            prompt_ids=out.prompt_ids, completion_ids=out.completion_ids, text=out.text,
            fast_weight_version=version, snapshot=snapshot, temperature=temperature, logprobs=out.logprobs, **fields))
        if timing is not None:
            traj.timings[timing] = traj.timings.get(timing, 0.0) + out.seconds

    # ---- the steps of an episode ----------------------------------------------------------------------------

    def _begin(self, env: Environment, tasks: list[Task], episode: Episode | None) -> Episode:
        """A new episode (fast weights reset, sampling reseeded), or `episode` going on with new environment
        states for `tasks`."""
        n = len(tasks)
        if self.fast is not None and n > self.fast.num_slots:
            raise ValueError(f"{n} rollouts but only {self.fast.num_slots} fast-weight slots")
        states = [env.reset(task)[0] for task in tasks]
        if episode is not None:
            if len(episode.rollouts) != n:
                raise ValueError(f"the episode to continue has {len(episode.rollouts)} rollouts, got {n} tasks")
            for ctx, state in zip(episode.rollouts, states):
                ctx.state = state
            return episode
        self.reseed()
        if self.fast is not None and not self.config.carry_fast_weights:
            self.fast.reset(range(n))
        episode = Episode([WorkingContext(state, Trajectory(g, t.task_id, t.question, list(t.answers)),
                                          acting=bool(env.tools))
                           for g, (t, state) in enumerate(zip(tasks, states))])
        for ctx in episode.rollouts:
            ctx.trajectory.timings = {"generate_extraction": 0.0, "inner_update": 0.0, "generate_answer": 0.0}
            if self.memory.version(ctx.rollout):  # carried fast weights are live from the first segment
                episode.snapshots[self.snapshot_key(ctx.rollout)] = self.fast.snapshot([ctx.rollout])
        return episode

    def _enforce_budget(self, env: Environment, episode: Episode, rollouts: list[WorkingContext]) -> None:
        over = [ctx for ctx in rollouts if ctx.over(self.config.budget(env))]
        if over:
            self.memory.over_budget(env, episode, over)

    def _turn(self, env: Environment, episode: Episode, acting: list[WorkingContext]) -> None:
        """One action per acting rollout: a tool call's result or a malformed action's error joins its context; an
        answer ends its episode."""
        cfg, closing = self.config, closing_tags(env.tools)
        prefill = ACTION_PREFILL if cfg.prefill else ""
        example = env.example_turns() if cfg.examples else []
        prompts = []
        for ctx in acting:
            turn = env.turn_prompt(ctx.task, ctx.text(), env.max_turns - ctx.trajectory.turns)
            messages = [{"role": "system", "content": env.instructions(ctx.task)}, *example,
                        {"role": "user", "content": turn}]
            prompts.append(self.sampler.prompt_ids(messages, prefill=prefill))
        outs = self.sampler.sample(prompts, [ctx.rollout for ctx in acting], cfg.max_action_tokens, cfg.temperature,
                                   stop_strings=closing,
                                   cut=lambda cs: [through_closing_tag(self.tokenizer, c, closing) for c in cs])
        actions = [parse_action(strip_thinking(prefill + out.text), env.tools) for out in outs]
        env.prefetch([(ctx.state, a.name, a.argument) for ctx, a in zip(acting, actions) if a.kind == TOOL])
        for ctx, out, action in zip(acting, outs, actions):
            traj = ctx.trajectory
            self.record(episode, ctx, out, "answer" if action.kind == ANSWER else "action", cfg.temperature,
                        "generate_action", chunk_index=traj.turns)
            traj.actions.append(ActionTurn(traj.turns, action.kind, action.name, action.argument, action.error))
            traj.turns += 1
            if action.kind == ANSWER:
                self._finish(env, ctx, action.argument)
                continue
            if action.kind == TOOL:
                result = env.step(ctx.state, Action(ActionKind.TOOL, action.argument, tool=action.name))
                traj.shaping_reward += result.reward
                traj.tool_calls += 1
                piece = format_call(action.name, action.argument, result.observation.text)
            else:
                traj.malformed_actions += 1
                piece = f"{(prefill + out.text).strip()}\n(not an action: {action.error})"
            ctx.add(piece, self.sampler.count_tokens(piece))

    def _answer(self, env: Environment, episode: Episode, rollouts: list[WorkingContext]) -> None:
        """Ask `rollouts` every question of their tasks with the environment's answer prompt, in one batch, each
        rollout under its own fast weights, and score the answers."""
        rows = [(ctx, i, asked) for ctx in rollouts for i, asked in enumerate(ctx.task.asked())]
        outs = self.answer(env, [ctx.rollout for ctx, _, _ in rows], [asked for _, _, asked in rows],
                           [ctx.text() for ctx, _, _ in rows])
        for (ctx, i, _), out in zip(rows, outs):
            traj = ctx.trajectory
            # One batch answered all of a rollout's questions: its time counts once.
            self.record(episode, ctx, out, "answer", self.config.temperature, "generate_answer" if i == 0 else None,
                        chunk_index=traj.turns if ctx.acting else ctx.state.cursor, question=i)
            if ctx.acting:  # the turn limit ended the episode: this answer was asked for
                traj.forced_answer = True
                traj.actions.append(ActionTurn(traj.turns, FORCED_ANSWER, "", out.text, ""))
            self._finish(env, ctx, out.text, question=i)

    @staticmethod
    def _finish(env: Environment, ctx: WorkingContext, prediction: str, question: int = 0) -> None:
        """The rollout answers one of its task's questions, which the environment scores; after the last one the
        episode is over, its reward the mean over the questions."""
        traj, asked = ctx.trajectory, ctx.task.asked()
        result = env.step(ctx.state, Action(ActionKind.ANSWER, prediction, question=question))
        q = asked[question]
        traj.answered.append(AnsweredQuestion(
            question_id=str(q.question_id), question=q.question, answers=list(q.answers), prediction=prediction,
            reward=float(result.reward), metrics=dict(result.info), category=q.metadata.get("category")))
        if len(traj.answered) == len(asked):
            traj.close()
