"""Decoding with a static KV cache: the prompt is prefilled once, then every decode step has the same shapes.

Fixed shapes are what lets a decode step be captured once as a CUDA graph and replayed: on a GPU, `StaticDecoder`
keeps one captured step per (rows, cache length) bucket and replays it; on a CPU the same loop runs eagerly.

What a captured step reads lives in buffers that never move, so a graph stays valid across calls:
- the step's inputs (token, position, cache position), copied in place before each replay;
- the attention mask, written once per call: future cache positions are hidden by causality, so the mask only has
  to hide each row's padding (at the left, and between a shared prefix and the row's own tail) and never changes
  while decoding;
- each row's fast-weight slot (`FastWeights.use` copies slots into one buffer per row count) and the fast weights
  themselves, which the inner loop updates in place: an absorb between two calls needs no recapture.
A graph is recaptured only when some tensor it reads was replaced (the model moved, ZeRO-3 gathered its weights
afresh); that is checked from the tensors' addresses on every call.

Sampling runs outside the graph on the step's logits (HF warpers and the runner's Gumbel noise, no host sync), and
stop tokens and stopping criteria are checked on the host only every `stop_check_every` steps, so steps are queued
back to back.
"""

from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessorList, StaticCache, StoppingCriteria

from tmem_rl.memory.layers import logits_to_keep_argument, model_cache_argument
from tmem_rl.prefill import layout_positions, prefill_prefixes, shared_prefill

# With graphs, cache lengths are rounded up to a multiple of this, so prompts of similar length share one cache
# and one graph.
CACHE_LENGTH_STEP = 256
# Each bucket holds a KV cache of rows x length tokens (5 GiB for 8 x 4.6K tokens of a 4B model in bf16): keep few.
MAX_BUCKETS = 4


def bucket_rows(rows: int) -> int:
    """Row counts are padded up to a power of two when graphs are captured (few graphs, bounded padding)."""
    return 1 << max(rows - 1, 0).bit_length()


@dataclass
class _Bucket:
    """One (rows, cache length) shape: its KV cache, the static buffers a decode step reads, its graph."""

    cache: StaticCache
    token: torch.Tensor  # [R, 1]
    position: torch.Tensor  # [R, 1]
    cache_position: torch.Tensor  # [1]
    mask: torch.Tensor  # [R, L]
    capturable: bool = False  # graphs are on and the cache's layers can be replayed
    graph: "torch.cuda.CUDAGraph | None" = None
    logits: torch.Tensor | None = None  # [R, 1, vocab], written by each replay
    fingerprint: tuple[int, ...] = ()


class StaticDecoder:
    """Greedy or processor-driven decoding of left-padded prompts, row i under fast-weight slot slots[i].

    `graphs`: capture decode steps as CUDA graphs (default: when the model is on a CUDA device).
    `timed`: wait for the device at the end of each prefill and each call, so that the time is split between them
    exactly (costs a pipeline bubble per call; for benchmarks). Every call appends {"rows", "prefill_seconds",
    "decode_seconds", "decode_steps"} to `calls`; `captures` counts graph captures.
    """

    def __init__(self, model, fast=None, graphs: bool | None = None, timed: bool = False):
        self.model = model
        self.fast = fast
        self.graphs = graphs
        self.timed = timed
        self.calls: list[dict] = []
        self.captures = 0
        self._buckets: OrderedDict[tuple[int, int], _Bucket] = OrderedDict()
        self._pool = None  # one CUDA memory pool shared by every captured graph
        # A PEFT wrapper forwards **kwargs: the names it accepts are its base model's.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not getattr(base, "_can_compile_fullgraph", False):
            raise ValueError(f"{type(base).__name__} does not support a static KV cache (transformers marks it "
                             "_can_compile_fullgraph=False); use EpisodeConfig.decoder='generate'")
        self._cache_arg = model_cache_argument(base)
        self._last_logits_only = logits_to_keep_argument(base, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def capturing(self) -> bool:
        if self.graphs is not None:
            return self.graphs
        # ZeRO-3 runs its own hooks, streams and events in every forward: not something to capture.
        return self.device.type == "cuda" and not any(hasattr(p, "ds_id") for p in self.model.parameters())

    def release(self) -> None:
        """Free every bucket's KV cache and graph (e.g. before a training step needs the memory)."""
        self._buckets.clear()

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
               stop_ids: list[int], pad_id: int, slots: list[int] | None = None,
               processors: LogitsProcessorList | None = None, stopping: StoppingCriteria | None = None,
               stop_check_every: int = 8, shared: list[nn.Module] | tuple = (), prefix_width: int = 0) -> torch.Tensor:
        """Tokens generated after `input_ids` ([rows, new]): argmax of the processed scores (processors may add
        sampling noise), rows padded with `pad_id` after their first stop token or the token at which `stopping`
        stopped them. The same tokens as `model.generate(..., do_sample=False, logits_processor=processors,
        stopping_criteria=[stopping])[:, width:]` under `fast.use(slots)`. `shared`: decoder layers the prefill
        runs once per distinct prompt (`tmem_rl.prefill`). `prefix_width`: the prompts are a `PrefixLayout` whose
        prefixes run once per distinct (prefix, slot)."""
        rows, width = input_ids.shape
        device = self.device
        graphs = self.capturing()
        padded_rows = bucket_rows(rows) if graphs else rows
        bucket = self._bucket(padded_rows, width + max_new_tokens, graphs)
        if padded_rows > rows:  # extra rows repeat row 0 under the base model; their tokens are dropped
            extra = padded_rows - rows
            input_ids = torch.cat([input_ids, input_ids[:1].expand(extra, -1)])
            attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(extra, -1)])
        slots = list(slots) if slots is not None else [-1] * rows
        slots += [-1] * (padded_rows - rows)
        # Always through the hooks when there are fast weights, base-model rows included (their delta is masked to
        # zero): a graph captured without them would replay without them for every later call in its bucket.
        live = self.fast.use(slots, static=True) if self.fast is not None else nullcontext()
        fingerprint = self._fingerprint() if graphs else ()
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with live:
            started = time.perf_counter()
            bucket.cache.reset()  # the write position lives in the cache (a tensor, so that replays advance it)
            bucket.mask.fill_(1)
            bucket.mask[:, :width].copy_(attention_mask)
            positions = layout_positions(attention_mask)
            cached = self._prefill_prefixes(bucket, input_ids, attention_mask, prefix_width, slots, shared, rows)
            with shared_prefill(shared, input_ids, attention_mask, width=width - cached):
                logits = self.model(input_ids=input_ids[:, cached:], attention_mask=bucket.mask,
                                    position_ids=positions[:, cached:],
                                    cache_position=torch.arange(cached, width, device=device), use_cache=True,
                                    **{self._cache_arg: bucket.cache}, **self._last_logits_only).logits[:rows, -1]
            bucket.position.copy_(positions[:, -1:])
            prefilled = self._clock()
            stops = torch.tensor(stop_ids, device=device)
            finished = torch.zeros(rows, dtype=torch.bool, device=device)
            generated = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
            sequence = input_ids[:rows]
            steps = checked = 0
            while steps < max_new_tokens:
                scores = logits.float()
                if processors:
                    scores = processors(sequence, scores)
                token = torch.where(finished, torch.full_like(finished, pad_id, dtype=torch.long), scores.argmax(-1))
                generated[:, steps] = token
                finished |= torch.isin(token, stops)
                steps += 1
                check = steps == max_new_tokens or steps % stop_check_every == 0
                if check and stopping is not None:
                    finished |= self._stopped(stopping, input_ids[:rows], generated, checked, steps, pad_id)
                    checked = steps
                if steps == max_new_tokens or (check and bool(finished.all())):
                    break
                if processors:  # only they read the tokens so far
                    sequence = torch.cat([sequence, token[:, None]], dim=1)
                bucket.token[:rows, 0] = token
                bucket.position.add_(1)
                bucket.cache_position.fill_(width + steps - 1)
                logits = self._step(bucket, fingerprint)[:rows, -1]
            done = self._clock()
        if self.timed:  # the first token comes from the prefill's logits
            self.calls.append({"rows": rows, "prefill_seconds": prefilled - started,
                               "decode_seconds": done - prefilled, "decode_steps": max(steps - 1, 0)})
        return generated[:, :steps]

    def _prefill_prefixes(self, bucket: _Bucket, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          prefix_width: int, slots: list[int], shared, rows: int) -> int:
        """Writes a prefix layout's prefixes into the bucket's cache, each run once -> the columns now cached (0 when
        there is no layout or the model's cache cannot hold a prefix). Rows past `rows` (padding up to a graph's
        row count) take row 0's prefix: their tokens are dropped."""
        if not prefix_width:
            return 0
        prefixes = prefill_prefixes(self.model, self.fast, input_ids[:rows], attention_mask[:rows], prefix_width,
                                    torch.tensor(slots[:rows], device=self.device), shared)
        if prefixes is None:
            return 0
        prefixes.write_into(bucket.cache, extra=len(input_ids) - rows)
        return prefix_width

    @staticmethod
    def _stopped(stopping: StoppingCriteria, prompt: torch.Tensor, generated: torch.Tensor, checked: int,
                 steps: int, pad_id: int) -> torch.Tensor:
        """Rows that `stopping` stops, shown the tokens of steps checked..steps one step at a time, as `generate`
        shows them; a stopped row's later tokens become padding. -> [rows] bool on the tokens' device."""
        sequence = torch.cat([prompt, generated[:, :steps]], dim=1).cpu()  # the one host sync of this check
        width = prompt.shape[1]
        stopped = torch.zeros(len(generated), dtype=torch.bool)
        for step in range(checked + 1, steps + 1):
            now = stopping(sequence[:, : width + step], None).cpu()
            for row in (now & ~stopped).nonzero().flatten().tolist():
                generated[row, step:steps] = pad_id
            stopped |= now
        return stopped.to(generated.device)

    def _clock(self) -> float:
        if self.timed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ---- buckets and graphs ------------------------------------------------------------------------------------

    def _bucket(self, rows: int, length: int, graphs: bool) -> _Bucket:
        if graphs:  # eager steps need no shared shapes, and attention over unused positions is not free
            length = -(-length // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP
        key = (rows, length)
        if key in self._buckets:
            self._buckets.move_to_end(key)
            return self._buckets[key]
        while len(self._buckets) >= MAX_BUCKETS:
            self._buckets.popitem(last=False)
        device = self.device
        dtype = next(self.model.parameters()).dtype
        cache_kwargs = {"config": self.model.config, "max_cache_len": length}
        if "max_batch_size" in inspect.signature(StaticCache.__init__).parameters:  # older transformers
            cache_kwargs.update(max_batch_size=rows, device=device, dtype=dtype)
        cache = StaticCache(**cache_kwargs)
        bucket = _Bucket(
            cache=cache,
            capturable=graphs and self._graph_safe(cache),
            token=torch.zeros(rows, 1, dtype=torch.long, device=device),
            position=torch.zeros(rows, 1, dtype=torch.long, device=device),
            cache_position=torch.zeros(1, dtype=torch.long, device=device),
            mask=torch.ones(rows, length, dtype=torch.long, device=device),
        )
        self._buckets[key] = bucket
        return bucket

    def step_logits(self, bucket: _Bucket) -> torch.Tensor:
        """One decode step from the bucket's buffers, eagerly: [R, 1, vocab]. This is what a graph captures."""
        return self.model(input_ids=bucket.token, attention_mask=bucket.mask, position_ids=bucket.position,
                          cache_position=bucket.cache_position, use_cache=True,
                          **{self._cache_arg: bucket.cache}).logits

    def _step(self, bucket: _Bucket, fingerprint: tuple[int, ...]) -> torch.Tensor:
        if not bucket.capturable:
            return self.step_logits(bucket)
        with torch.cuda.device(self.device):
            if bucket.graph is None or bucket.fingerprint != fingerprint:
                self._capture(bucket)
                self.captures += 1
                bucket.fingerprint = fingerprint
            bucket.graph.replay()
        return bucket.logits

    @staticmethod
    def _graph_safe(cache: StaticCache) -> bool:
        """Only plain static layers keep their write position in a tensor that a replay advances (a sliding-window
        layer keeps a Python int, which a graph would freeze at its captured value)."""
        layers = getattr(cache, "layers", None)
        return layers is None or all(type(layer).__name__ == "StaticLayer" for layer in layers)

    def _fingerprint(self) -> tuple[int, ...]:
        """Addresses of every tensor a captured step reads besides its own buffers, and whether the fast-weight
        hooks are attached."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        hooks = 0
        if self.fast is not None:
            tensors += list(self.fast.A.values()) + list(self.fast.B.values())
            hooks = len(self.fast._handles)
        return (hooks, *(t.data_ptr() for t in tensors))

    def _capture(self, bucket: _Bucket) -> None:
        # Capture needs a warm-up on a side stream. The warm-up computes real steps, which write keys and values and
        # (in caches that track it) advance the write position: put the position back, so that the replay that
        # follows writes where this step belongs.
        counters = [layer.cumulative_length for layer in getattr(bucket.cache, "layers", [])
                    if torch.is_tensor(getattr(layer, "cumulative_length", None))]
        saved = [counter.clone() for counter in counters]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step_logits(bucket)
                for counter, value in zip(counters, saved):
                    counter.copy_(value)
        torch.cuda.current_stream().wait_stream(side)
        bucket.graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(bucket.graph, pool=self._pool):
            bucket.logits = self.step_logits(bucket)
