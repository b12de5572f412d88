"""Sampling a batch of segments: chat prompts as ids, either decoder, sampling noise that depends only on the
seed, stops, the log-probs the outer loop needs, and the wall time of each batch."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tmem_rl.chat import chat_ids, chat_template_kwargs, left_padded, stop_token_ids
from tmem_rl.decoding import StaticDecoder
from tmem_rl.episode.config import LOGPROB_ROWS, EpisodeConfig
from tmem_rl.extraction import PairReader
from tmem_rl.logprobs import build_rows, completion_logprobs
from tmem_rl.memory.fast_weights import FastWeights
from tmem_rl.memory.layers import decoder_layers, layers_below_fast_weights, model_cache_argument
from tmem_rl.prefill import full_attention_only, prefill_prefixes, prefix_layout, shared_prefill


@dataclass
class Generated:
    text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    seconds: float  # wall time of the batch that generated it
    logprobs: list[float] | None = None


class Sampler:
    """Batched, KV-cached generation for an episode runner; row i of a batch runs under fast-weight slot slots[i]
    (-1: the base model)."""

    def __init__(self, model, tokenizer, fast: FastWeights | None, config: EpisodeConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.fast = fast
        self.config = config
        self.chat_kwargs = chat_template_kwargs(tokenizer, config.chat_template_kwargs)
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.generator = torch.Generator(device=self.device)
        self.generation_calls = 0
        # It keeps KV caches and graphs between calls; built here so that an unsupported model fails at once.
        self.static_decoder = StaticDecoder(model, fast) if config.decoder == "static" else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reseed(self) -> None:
        """Restart sampling from EpisodeConfig.seed (every episode does; so does each batch of an evaluation
        method that answers without reading): the noise of a generation call depends on the seed and on how many
        calls came before it since."""
        self.generation_calls = 0

    def prompt_ids(self, messages: list[dict[str, str]], prefill: str = "") -> list[int]:
        return chat_ids(self.tokenizer, messages, self.chat_kwargs, generation_prompt=True, suffix=prefill)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def sample(self, prompts: list[list[int]], slots: list[int], max_new_tokens: int, temperature: float,
               sampled: bool | None = None, stop_strings: list[str] | None = None,
               stopping: StoppingCriteria | None = None,
               cut: Callable[[list[list[int]]], list[list[int]]] | None = None) -> list[Generated]:
        """Generate a batch, cut each row where its segment ends (`cut`), and take the log-probs of what is kept:
        every generated segment of an episode goes through here. `sampled`: None follows EpisodeConfig.do_sample."""
        sample = self.config.do_sample if sampled is None else sampled
        t0 = time.perf_counter()
        completions = self.generate(prompts, slots, max_new_tokens, sample, temperature, stop_strings=stop_strings,
                                    stopping=stopping)
        if cut is not None:
            completions = cut(completions)
        elapsed = time.perf_counter() - t0
        logprobs = self.logprobs(prompts, completions, slots, temperature)
        return [Generated(self.tokenizer.decode(c, skip_special_tokens=True), p, c, elapsed, lp)
                for p, c, lp in zip(prompts, completions, logprobs)]

    @torch.no_grad()
    def logprobs(self, prompts, completions, slots, temperature) -> list[list[float] | None]:
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

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], slots: list[int], max_new_tokens: int, sample: bool,
                 temperature: float, stop_strings: list[str] | None = None,
                 stopping: StoppingCriteria | None = None) -> list[list[int]]:
        """Batched, KV-cached generation; row i runs under fast-weight slot slots[i] (-1: the base model).

        `stop_strings`: a row may stop once its text holds one (the "generate" decoder), and `stopping` (either
        decoder) once it says so, to save time; the tokens up to the stop are the same either way, and callers cut
        each row there themselves (padding follows it)."""
        pad = self.tokenizer.pad_token_id
        if self.config.memory != "fast_weights":
            slots = [-1] * len(slots)
        # Prompts that begin alike prefill that beginning once: through every layer under the same fast weights
        # (the questions of one reading), below the fast weights under any (a group's later extraction prompts).
        layout = None
        if self.config.shared_prefill and full_attention_only(self.model):
            layout = prefix_layout(prompts, slots, pad, len(self.shared_layers()) / len(decoder_layers(self.model)))
        if layout is None:
            input_ids, attention_mask = left_padded(prompts, pad)
        else:
            input_ids, attention_mask = layout.input_ids, layout.attention_mask
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        prefix_width = layout.prefix_width if layout is not None else 0
        # Sampling draws from the runner's own generator (Gumbel-max over HF's warped scores, decoded greedily), so
        # an episode is reproducible from EpisodeConfig.seed and the caller's global RNG is never touched.
        processors = LogitsProcessorList([])
        if sample:
            key = counter_seed(self.config.seed, self.generation_calls)
            processors.extend([*self._warpers(temperature),
                               GumbelNoise(self._sampling_generator(), key, input_ids.shape[1])])
        self.generation_calls += 1
        if self.config.decoder == "static":
            if self.static_decoder is None:
                self.static_decoder = StaticDecoder(self.model, self.fast)
            new_tokens = self.static_decoder.decode(input_ids, attention_mask, max_new_tokens, self.stop_ids, pad,
                                                    slots, processors, stopping, shared=self.shared_layers(),
                                                    prefix_width=prefix_width)
        else:
            prefixes = None
            if prefix_width:
                prefixes = prefill_prefixes(self.model, self.fast, input_ids, attention_mask, prefix_width,
                                            torch.tensor(slots, device=self.device), self.shared_layers())
            live = self.fast.use(slots) if self.fast is not None and max(slots) >= 0 else nullcontext()
            cached = {model_cache_argument(self.model): prefixes.fanned_out()} if prefixes is not None else {}
            width = input_ids.shape[1] - (prefix_width if prefixes is not None else 0)
            with live, shared_prefill(self.shared_layers(), input_ids, attention_mask, width=width):
                new_tokens = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    **cached,
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

    def shared_layers(self) -> list:
        """The decoder layers a prefill may run once per distinct prompt: those below the first fast-weight layer
        (all of them without fast weights); none when EpisodeConfig.shared_prefill is off."""
        if not self.config.shared_prefill:
            return []
        return layers_below_fast_weights(self.model, self.fast.config if self.fast is not None else None)

    def _warpers(self, temperature: float) -> list[LogitsProcessor]:
        warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(temperature)]
        if self.config.top_k:
            warpers.append(TopKLogitsWarper(self.config.top_k))
        if self.config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.config.top_p))
        return warpers

    def _sampling_generator(self) -> torch.Generator:
        if self.generator.device != self.device:  # the model moved since the runner was built
            self.generator = torch.Generator(device=self.device)
        return self.generator


def through_closing_tag(tokenizer, completion: list[int], closing: list[str]) -> list[int]:
    """The completion cut just past the first token whose text completes a closing tag, as generation that stops
    at the tag ends (either decoder gives the same tokens). What follows, padding included, was never part of the
    action and gets no log-prob."""
    if not any(tag in tokenizer.decode(completion, skip_special_tokens=True) for tag in closing):
        return completion
    for end in range(1, len(completion) + 1):
        text = tokenizer.decode(completion[:end], skip_special_tokens=True)
        if any(tag in text for tag in closing):
            return completion[:end]
    return completion


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
