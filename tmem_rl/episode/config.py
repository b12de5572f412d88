"""How an episode reads, extracts, samples and answers: `EpisodeConfig`, a recipe's `episode:` section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MEMORY_MODES = ("fast_weights", "none", "window", "full", "summary")
SEGMENT_KINDS = ("extraction", "action", "answer", "summary")
EXTRACTORS = ("policy", "reference")
DECODERS = ("generate", "static")
SUPERVISIONS = ("qa_pairs", "transcript", "summary")
# Rows per teacher-forced pass when an episode records log-probs.
LOGPROB_ROWS = 8
# The fixed request that text supervision ("transcript", "summary") is trained as the answer to.
RECALL_REQUEST = "Recall what you have read so far."
# The paper's LoCoMo budget: the working context of an environment that names no budget of its own.
DEFAULT_L_MAX = 4096


@dataclass
class EpisodeConfig:
    """One set of defaults for training, evaluation and the agent. The sampling defaults are the paper's inference
    settings (temperature 0.4, top_p 0.9, top_k 10; used when do_sample); training replaces them with
    `outer_loop`'s and caps the budgets at its max_completion_length."""

    l_max: int | None = None
    """Working-context budget in tokens; exceeding it triggers an extraction action. None: the environment's own
    (`Environment.default_l_max`, e.g. search 8192), else 4096, the paper's LoCoMo budget."""
    memory: str = "fast_weights"
    """What happens when the working context exceeds l_max. "fast_weights": extract and absorb, then clear.
    Baselines: "none" drops the context; "window" keeps the most recent whole chunks or turns that fit l_max (one
    longer than l_max keeps its last l_max tokens); "full" keeps it all (no budget); "summary" rewrites running
    notes from it (shown in every later prompt), then clears it."""
    max_pairs: int = 8
    """Pairs asked for per extraction."""
    explicit_notes: int = 0
    """memory "fast_weights": show this many of the pairs absorbed so far (the best BM25 matches of the question)
    as notes in every later prompt as well (TMEM + explicit memory); 0: the pairs live in the fast weights only."""
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
    max_answer_tokens: int = 50
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
    temperature: float = 0.4
    """Sampling temperature (also the temperature every recorded log-prob is taken at)."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0: all)."""
    top_k: int = 10
    """Top-k sampling (0: no top-k filtering)."""
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
    shared_prefill: bool = True
    """Prefill the layers below the first fast-weight layer once per distinct prompt of a batch (`tmem_rl.prefill`):
    a group's rollouts share their prompt at each extraction point and at the answer. And prompts that begin alike
    prefill that beginning once: through every layer under the same fast weights (the questions of one reading,
    answered after it), through the layers below the fast weights under any (a group's extraction prompts after
    its first extraction, which end in each rollout's own earlier pairs). The same tokens as False, which runs
    every row through every layer."""
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
        if self.l_max is not None and (not isinstance(self.l_max, int) or self.l_max < 1):
            raise ValueError(f"EpisodeConfig.l_max={self.l_max!r}: expected a positive token budget (or None: the "
                             "environment's own)")
        if self.explicit_notes < 0:
            raise ValueError(f"EpisodeConfig.explicit_notes={self.explicit_notes}: expected 0 or more pairs")
        if self.max_pairs < 1:
            raise ValueError(f"EpisodeConfig.max_pairs={self.max_pairs}: expected at least 1 pair per extraction")
        if self.decoder not in DECODERS:
            raise ValueError(f"EpisodeConfig.decoder={self.decoder!r}: expected one of {DECODERS}")
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"EpisodeConfig.extractor={self.extractor!r}: expected one of {EXTRACTORS}")

    def budget(self, env) -> int:
        """The working-context budget in `env`: l_max, else the environment's own, else DEFAULT_L_MAX."""
        return self.l_max or getattr(env, "default_l_max", None) or DEFAULT_L_MAX
