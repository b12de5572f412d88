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

from tmem_rl.episode.config import (DECODERS, EXTRACTORS, LOGPROB_ROWS, MEMORY_MODES, RECALL_REQUEST, SEGMENT_KINDS,
                                    SUPERVISIONS, EpisodeConfig)
from tmem_rl.episode.context import Episode, WorkingContext
from tmem_rl.episode.records import (ActionTurn, AnsweredQuestion, EpisodeBatch, Extraction, InnerUpdate, Segment,
                                     Trajectory)
from tmem_rl.episode.runner import EpisodeRunner
from tmem_rl.episode.sampler import Generated, GumbelNoise, PairStopping, Sampler, counter_seed

__all__ = ["DECODERS", "EXTRACTORS", "LOGPROB_ROWS", "MEMORY_MODES", "RECALL_REQUEST", "SEGMENT_KINDS", "SUPERVISIONS",
           "ActionTurn", "AnsweredQuestion", "Episode", "EpisodeBatch", "EpisodeConfig", "EpisodeRunner", "Extraction",
           "Generated", "GumbelNoise", "InnerUpdate", "PairStopping", "Sampler", "Segment", "Trajectory",
           "WorkingContext", "counter_seed"]
