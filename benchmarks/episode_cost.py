"""What one TMEM episode costs, and where the time goes: prefill, extraction decode, inner update, answer.

A randomly initialised model of a real shape, built on the device, reads a stream of a LoCoMo conversation's
length (conv-30: 12.9K tokens) in rollouts of G in lockstep, through the static-cache decoder (CUDA graphs on a
GPU). Every extraction runs to its token budget and absorbs a fixed number of pairs (a random model writes no JSON:
the parser is replaced as in grpo_step.py), so the work per episode is fixed. For each stream length and G:
seconds per episode and its breakdown, tokens decoded per second, peak memory. Beside them, at the largest G
measured with a stream of 1x: the same episode with the group-shared prefill off (`EpisodeConfig.shared_prefill`:
every row through every layer), its prefill and episode time over the shared one's and whether the tokens are the
same; the questions of one reading answered full-context (each prompt the stream's last tokens, then its question)
with their common beginning prefilled once and with every prompt whole; the decode step in ms next to the
memory-bandwidth limit (the model's weights plus the KV cache read once per step, over a bandwidth measured here by
a large device copy), and `model.generate`'s decode step on the same prompts. (The fixed parser writes the same
pairs in every rollout, so every extraction prompt of a group is the same; with `--own-pairs` the rollouts sample
and each writes pairs of its own, as with a real policy, so the prompts after the first extraction share only their
beginning: the instructions and the window, before each rollout's earlier pairs.)

    python benchmarks/episode_cost.py                                   # CPU: SmolLM2-135M shape, reduced sizes
    python benchmarks/episode_cost.py --shape qwen3-4b --device cuda --dtype bfloat16
    python benchmarks/episode_cost.py --quick                           # 4 layers, L_max 256, G 1 and 2: seconds

CPU defaults are reduced (L_max 1024, a quarter-length stream, G 1 and 8, 1x and 2x) so that the run takes
minutes on 2 cores; the GPU defaults are the paper's setting (L_max 4096, 12.9K tokens, G 1/8/64, 1x/2x/4x).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import torch
from transformers import AutoModelForCausalLM

import tmem_rl.episode.memory as episode_memory
from tmem_rl.chat import left_padded
from tmem_rl.decoding import StaticDecoder
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.models import FIXTURE_TOKENIZER, load_tokenizer
from tmem_rl.episode import EpisodeConfig, EpisodeRunner
from tmem_rl.evaluation.methods import METHODS, MethodSettings

from _quick import parse_args  # noqa: E402  (benchmarks/ is on the path when a script here runs)
from grpo_step import STREAM, BenchEnv, fixed_pairs  # noqa: E402
from inner_update import SHAPES  # noqa: E402

LOCOMO_TOKENS = 12_900  # conv-30, the longest LoCoMo conversation measured

# Four layers: the fewest that hold the default four adapted ones. A stream of twice L_max: every episode still
# extracts, absorbs and answers.
QUICK = {"num_layers": 4, "rollouts": [1, 2], "multiples": [1], "stream_tokens": 512, "l_max": 256,
         "pairs": 2, "extraction_tokens": 16, "answer_tokens": 8, "decode_rows": 2, "decode_tokens": 16,
         "questions": 4, "answer_context": 128}


def stream_of(tokenizer, tokens: int, chunk_tokens: int = 64) -> list[str]:
    """Chunks of about `chunk_tokens` tokens (a few turns of conversation) that add up to about `tokens`."""
    words = " ".join(STREAM).split()
    per_word = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) / len(words)
    words_per_chunk = max(1, round(chunk_tokens / per_word))
    count = max(1, round(tokens / chunk_tokens))
    return [" ".join(words[(i * words_per_chunk + j) % len(words)] for j in range(words_per_chunk))
            for i in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: torch.device) -> dict[str, float]:
    """GPU: peak allocated during the episode. CPU: the process's peak RSS so far (it never resets, so it only
    bounds the episode's peak from above)."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def bandwidth_gbs(device: torch.device) -> float:
    """Copy bandwidth (bytes read + written per second) of a buffer far larger than any cache."""
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    started = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 5 / (time.perf_counter() - started) / 1e9


def episode(model, tokenizer, chunks, rollouts: int, args, shared_prefill: bool = True) -> dict:
    device = next(model.parameters()).device
    fast = FastWeights(model, rollouts, FastWeightConfig())
    config = EpisodeConfig(l_max=args.l_max, max_pairs=args.pairs, max_extraction_tokens=args.extraction_tokens,
                           max_answer_tokens=args.answer_tokens, extraction_retries=0, grounding=False,
                           decoder="static", shared_prefill=shared_prefill, do_sample=args.own_pairs)
    runner = EpisodeRunner(model, tokenizer, fast, config)
    env = BenchEnv(chunks)
    if device.type == "cuda":
        runner.run(env, [env.task(0)] * rollouts)  # warm-up: kernels, allocator, graph capture
    decoder = runner.sampler.static_decoder
    decoder.timed, decoder.calls, decoder.captures = True, [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    started = time.perf_counter()
    try:
        batch = runner.run(env, [env.task(0)] * rollouts)
        sync(device)
    finally:
        fast.remove()
        decoder.release()
    seconds = time.perf_counter() - started
    extraction_calls = decoder.calls[:-1]  # the episode's last call answers
    timings = batch.trajectories[0].timings  # lockstep: the same for every rollout
    parts = {
        "extraction_prefill": sum(c["prefill_seconds"] for c in extraction_calls),
        "extraction_decode": sum(c["decode_seconds"] for c in extraction_calls),
        "inner_update": timings["inner_update"],
        "answer": timings["generate_answer"],
    }
    parts["other"] = seconds - sum(parts.values())  # reading, prompts, parsing, snapshots
    steps = sum(c["decode_steps"] for c in extraction_calls)
    decoded = sum(len(s.completion_ids) for t in batch.trajectories for s in t.segments)
    first = batch.trajectories[0]
    return {
        "rollouts": rollouts,
        "stream_tokens": sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chunks),
        "extractions": len(first.extractions),
        "pairs_absorbed": sum(len(e.supervision.pairs) for e in first.extractions),
        "seconds_per_episode": seconds / rollouts,
        "seconds_per_batch": seconds,
        "breakdown_seconds_per_batch": parts,
        "extraction_decode_step_ms": 1000 * parts["extraction_decode"] / max(steps, 1),
        "tokens_decoded_per_s": decoded / seconds,
        "graph_captures": decoder.captures,
        "shared_prefill": shared_prefill,
        "tokens": [s.completion_ids for t in batch.trajectories for s in t.segments],
        **peak_memory(device),
    }


def prefill_comparison(shared: dict, unshared: dict) -> dict:
    """The group-shared prefill's gain on one episode: ratios of unshared over shared time, and the tokens."""
    prefill = [row["breakdown_seconds_per_batch"]["extraction_prefill"] for row in (unshared, shared)]
    return {"rollouts": shared["rollouts"], "stream_tokens": shared["stream_tokens"],
            "extraction_prefill_s": {"unshared": prefill[0], "shared": prefill[1]},
            "extraction_prefill_speedup": prefill[0] / prefill[1],
            "episode_speedup": unshared["seconds_per_batch"] / shared["seconds_per_batch"],
            "same_tokens": unshared["tokens"] == shared["tokens"]}


def answer_sharing(model, tokenizer, args, shared: bool) -> dict:
    """The questions of one reading answered after it as full-context answers them (the stream's last
    `answer_context` tokens, then each question), in batches of `answer_batch_size`: seconds in prefill and in all,
    and the answers. With `shared`, each batch's common beginning (instructions and context) is prefilled once."""
    device = next(model.parameters()).device
    env = BenchEnv(stream_of(tokenizer, args.answer_context))
    reading = env.task(0)
    questions = [[dataclasses.replace(reading, task_id=f"bench-q{i}", question=f"What is said in turn {i + 1}?")
                  for i in range(args.questions)]]
    config = EpisodeConfig(memory="full", decoder="static", max_answer_tokens=args.answer_tokens,
                           shared_prefill=shared)
    method = METHODS["full-context"](EpisodeRunner(model, tokenizer, None, config), env,
                                     MethodSettings(context_budget=args.answer_context + 64))
    if device.type == "cuda":
        method.run([reading], questions)  # warm-up
    decoder = method.runner.sampler.static_decoder
    decoder.timed, decoder.calls = True, []
    sync(device)
    started = time.perf_counter()
    answered = method.run([reading], questions)
    sync(device)
    seconds = time.perf_counter() - started
    decoder.release()
    return {"seconds": seconds, "prefill_seconds": sum(c["prefill_seconds"] for c in decoder.calls),
            "answers": [a.prediction for a in answered[0]]}


def answer_comparison(model, tokenizer, args) -> dict:
    shared = answer_sharing(model, tokenizer, args, shared=True)
    whole = answer_sharing(model, tokenizer, args, shared=False)
    return {"questions": args.questions, "context_tokens": args.answer_context,
            "batch": MethodSettings().answer_batch_size, "answer_tokens": args.answer_tokens,
            "prefill_seconds_shared": shared["prefill_seconds"], "prefill_seconds_whole": whole["prefill_seconds"],
            "seconds_shared": shared["seconds"], "seconds_whole": whole["seconds"],
            "prefill_speedup": whole["prefill_seconds"] / shared["prefill_seconds"],
            "answer_speedup": whole["seconds"] / shared["seconds"],
            "same_answers": shared["answers"] == whole["answers"]}


def decode_step_comparison(model, tokenizer, rollouts: int, context: int, new_tokens: int) -> dict:
    """ms per decode step of the static decoder and of `model.generate` on the same prompts, and the bandwidth
    limit of such a step: every weight and every cached key and value read once."""
    device = next(model.parameters()).device
    fast = FastWeights(model, rollouts, FastWeightConfig())
    slots = list(range(rollouts))
    prompts = [[100 + (7 * i + j) % 3000 for j in range(context - i)] for i in range(rollouts)]
    ids, mask = left_padded(prompts, tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    decoder = StaticDecoder(model, fast, timed=True)
    no_stop = [-1]

    def static_ms() -> float:
        decoder.calls = []
        decoder.decode(ids, mask, new_tokens, no_stop, tokenizer.pad_token_id, slots)
        return 1000 * decoder.calls[0]["decode_seconds"] / decoder.calls[0]["decode_steps"]

    def generate_seconds(n: int) -> float:
        sync(device)
        started = time.perf_counter()
        with fast.use(slots):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        sync(device)
        return time.perf_counter() - started

    static_ms()  # warm-up and capture
    static = min(static_ms() for _ in range(2))
    generate_seconds(2)
    # generate's prefill is not separable: the difference of two lengths leaves the decode steps.
    generate = min(1000 * (generate_seconds(new_tokens + 1) - generate_seconds(1)) / new_tokens for _ in range(2))
    fast.remove()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    # The ideal step reads the keys and values written so far (the static path's attention spans its whole bucket,
    # up to 255 positions more).
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element * rollouts * (context + new_tokens // 2)
    bandwidth = bandwidth_gbs(device)  # bytes moved (read + written) per second
    limit = 1000 * (weights + kv) / (bandwidth * 1e9)
    return {"rows": rollouts, "context_tokens": context, "static_decode_step_ms": static,
            "generate_decode_step_ms": generate, "static_speedup_vs_generate": generate / static,
            "weights_gib": weights / 2**30, "kv_read_gib": kv / 2**30, "copy_bandwidth_gbs": bandwidth,
            "bandwidth_limit_ms": limit, "static_vs_limit": static / limit}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--num-layers", type=int, default=None, help="shrink the model to this many layers")
    parser.add_argument("--rollouts", type=int, nargs="+", default=None, help="G values (GPU 1 8 64; CPU 1 8)")
    parser.add_argument("--multiples", type=int, nargs="*", default=None,
                        help="stream lengths as multiples of --stream-tokens (GPU 1 2 4; CPU 1 2); none given: "
                             "only the decode-step comparison")
    parser.add_argument("--stream-tokens", type=int, default=None, help=f"GPU {LOCOMO_TOKENS}; CPU a quarter")
    parser.add_argument("--l-max", type=int, default=None, help="GPU 4096; CPU 1024")
    parser.add_argument("--pairs", type=int, default=8, help="pairs absorbed per extraction")
    parser.add_argument("--extraction-tokens", type=int, default=256)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--decode-rows", type=int, default=8, help="rows of the decode-step comparison")
    parser.add_argument("--decode-tokens", type=int, default=64, help="steps timed in the decode-step comparison")
    parser.add_argument("--own-pairs", action="store_true",
                        help="rollouts sample, and each writes pairs of its own (as a real policy does): a group's "
                             "extraction prompts after the first share only their beginning")
    parser.add_argument("--questions", type=int, default=16,
                        help="questions of one reading answered full-context with the shared prefix on and off "
                             "(0: skip)")
    parser.add_argument("--answer-context", type=int, default=None,
                        help="tokens of stream in each full-context answer prompt (GPU 4096, the method's default "
                             "budget; CPU 1024)")
    args = parse_args(parser, QUICK, argv)
    if args.questions < 0:
        parser.error(f"--questions must be 0 or more, got {args.questions}")
    if args.answer_context is not None and args.answer_context < 1:
        parser.error(f"--answer-context must be positive, got {args.answer_context}")
    gpu = args.device.startswith("cuda")
    args.rollouts = args.rollouts or ([1, 8, 64] if gpu else [1, 8])
    if args.multiples is None:
        args.multiples = [1, 2, 4] if gpu else [1, 2]
    args.stream_tokens = args.stream_tokens or (LOCOMO_TOKENS if gpu else LOCOMO_TOKENS // 4)
    args.l_max = args.l_max or (4096 if gpu else 1024)
    args.answer_context = args.answer_context or (4096 if gpu else 1024)

    config = SHAPES[args.shape]()
    if args.num_layers:
        config.num_hidden_layers = args.num_layers
    torch.manual_seed(0)
    with torch.device(args.device):  # built where it runs: no random init of billions of weights on a CPU first
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    tokenizer = load_tokenizer(FIXTURE_TOKENIZER)
    original = episode_memory.parse_qa_pairs
    episode_memory.parse_qa_pairs = fixed_pairs(args.pairs, by_text=args.own_pairs)
    results = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "layers": config.num_hidden_layers,
               "threads": torch.get_num_threads(), "l_max": args.l_max, "pairs_per_extraction": args.pairs,
               "extraction_tokens": args.extraction_tokens, "answer_tokens": args.answer_tokens, "quick": args.quick,
               "own_pairs": args.own_pairs,
               "episodes": []}
    if gpu:
        results["gpu"] = torch.cuda.get_device_name()
    try:
        for multiple in args.multiples:
            chunks = stream_of(tokenizer, args.stream_tokens * multiple)
            for rollouts in args.rollouts:
                try:
                    row = episode(model, tokenizer, chunks, rollouts, args)
                except torch.OutOfMemoryError as error:
                    row = {"rollouts": rollouts, "stream_multiple": multiple, "error": f"out of memory: {error}"[:200]}
                    torch.cuda.empty_cache()
                row["stream_multiple"] = multiple
                results["episodes"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
        shared = next((r for r in results["episodes"] if r["stream_multiple"] == args.multiples[0]
                       and r["rollouts"] == max(args.rollouts) and "error" not in r), None)
        if shared is not None:
            unshared = episode(model, tokenizer, stream_of(tokenizer, args.stream_tokens * args.multiples[0]),
                               shared["rollouts"], args, shared_prefill=False)
            results["shared_prefill"] = prefill_comparison(shared, unshared)
            print(json.dumps(results["shared_prefill"]), flush=True)
    finally:
        episode_memory.parse_qa_pairs = original
    for row in results["episodes"]:
        row.pop("tokens", None)
    if args.questions:
        results["answer_sharing"] = answer_comparison(model, tokenizer, args)
        print(json.dumps(results["answer_sharing"]), flush=True)
    results["decode_step"] = decode_step_comparison(model, tokenizer, args.decode_rows, args.l_max,
                                                   args.decode_tokens)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
