"""GRPO step throughput: tmem_rl (fast weights off / on) vs TRL's GRPOTrainer, side by side in one run.

Same model (randomly initialised, SmolLM2-135M shape by default: its completions run to the length limit, so
every system generates exactly the same number of tokens), same chat prompt, group size and completion length.

- tmem (vs TRL): episodes whose stream fits the budget: generate the answer, GRPO update. The same work as TRL.
- fast weights on: each rollout's stream exceeds L_max once: an extraction of the same length, an inner update
  on `--pairs` QA pairs, then the answer; the loss covers both segments, each under its live fast weights. A
  random model writes no parseable JSON, so the parser is replaced by one that returns `--pairs` pairs drawn from
  the text: the inner update then costs what it costs with a real extractor.
- fast weights off: the same episodes, extraction included, with the inner update skipped (every segment then
  runs on the base model): what the fast-weight machinery (inner update, snapshots, replay) adds.

Prints JSON with tmem_tokens_per_s, trl_tokens_per_s, ratio_vs_trl, and fast_weights_overhead (seconds per
generated token with fast weights on / off on the same episodes), plus the tokens/s behind it; and
fast_weights_work_overhead, the same ratio in GFLOP per generated token, counted over one step each (after
tmem_rl's timed runs, so it slows none of them, and before TRL's, whose trainer changes what later runs
compute): what the time ratio would be if every operation ran at the same rate.
The update with and without shared prompts (`GRPOConfig.shared_prompts`), fast weights on: update_s and
unshared_prompts_update_s (seconds per step), shared_prompts_update_speedup, and the step's work each way
(shared_prompts_work_ratio, unshared over shared).

    python benchmarks/grpo_step.py                  # CPU, 2 questions x 4 generations x 32 tokens
    python benchmarks/grpo_step.py --layers 30 --completion 128 --steps 4
    python benchmarks/grpo_step.py --shape qwen3-4b --layers 12 --completion 64 --device cuda --dtype bfloat16 \
        --decoder static
    python benchmarks/grpo_step.py --quick          # 2 layers, 1 question x 2 generations x 8 tokens, 2 steps
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import zlib

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, TrainerCallback

import tmem_rl.episode.memory as episode_memory
from tmem_rl.envs.base import Environment, Task
from tmem_rl.records import ParseRecord, QAPair
from tmem_rl.extraction import answer_messages
from tmem_rl.memory import FastWeightConfig
from tmem_rl.models import FIXTURE_TOKENIZER, load_tokenizer
from tmem_rl.episode import EpisodeConfig
from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer

from _quick import parse_args  # noqa: E402  (benchmarks/ is on the path when a script here runs)
from inner_update import SHAPES, gflop  # noqa: E402

# Two steps: the first is warm-up and not timed.
QUICK = {"layers": 2, "questions": 1, "generations": 2, "completion": 8, "pairs": 2, "steps": 2}

QUESTION = "Which city did Maya move to, and when is her birthday?"
STREAM = [
    "Maya: I finally moved to Lisbon last spring. Omar: The weather has been strange lately. "
    "Maya: My birthday is on March 14, we should celebrate. Lena: I work as a nurse in Porto. " * 2,
    "Omar: I adopted a dog called Biscuit. Lena: Let's meet at the harbour cafe at noon on Friday.",
]


class BenchEnv(Environment):
    name = "bench"

    def __init__(self, chunks):
        self.chunks = tuple(chunks)

    def __len__(self):
        return 64

    def task(self, index):
        return Task(f"bench-{index}", QUESTION, self.chunks, ("Lisbon, March 14",))

    def score(self, task, prediction):
        value = (hash(prediction) % 1000) / 1000.0  # arbitrary but varied: GRPO needs spread within a group
        return {"reward": value, "f1": value}


def fixed_pairs(count, by_text: bool = False):
    """A parser that finds `count` pairs in any text. `by_text`: which pairs depends on the extraction's text, so
    rollouts that sampled differently write different pairs (as a real policy's do)."""
    def parse(text, prefilled=False, source=None):
        words = (source or "maya lisbon").split()
        offset = zlib.crc32(text.encode()) % 1000 if by_text else 0
        pairs = [QAPair(f"What is item {i + offset} of the text?", words[(7 * i + offset) % len(words)])
                 for i in range(count)]
        return ParseRecord(raw=text, pairs=pairs)

    return parse


def tmem_run(model_fn, tokenizer, args, extraction: bool, fast_weights: bool = True, count: bool = False,
             shared_prompts: bool = True) -> dict:
    """{tokens_per_s, update_s}: generated tokens per second and the GRPO update's seconds per step, over the steps
    after the first; with `count`, {gflop_per_token} of one step instead (counted, so free of a shared CPU's
    noise)."""
    env = BenchEnv(STREAM if extraction else STREAM[1:])
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, max_steps=1 if count else args.steps, questions_per_step=args.questions,
                         num_generations=args.generations, learning_rate=1e-6, report_to=[], save_steps=0,
                         max_completion_length=args.completion, micro_batch_size=args.questions * args.generations,
                         shared_prompts=shared_prompts)
        chunk_tokens = len(tokenizer(STREAM[0])["input_ids"])
        episode = EpisodeConfig(l_max=chunk_tokens - 1 if extraction else 100_000, extraction_retries=0,
                                max_extraction_tokens=args.completion, max_answer_tokens=args.completion,
                                grounding=False, decoder=args.decoder)
        trainer = GRPOTrainer(cfg, model_fn(), tokenizer, env, FastWeightConfig(num_layers=min(4, args.layers)),
                              episode, accelerator=Accelerator(cpu=not args.device.startswith("cuda")))
        original = episode_memory.parse_qa_pairs
        episode_memory.parse_qa_pairs = fixed_pairs(args.pairs)
        if not fast_weights:
            trainer.fast.absorb = lambda *a, **k: {}
        history = []
        run = lambda: history.extend(trainer.train())  # noqa: E731
        try:
            work = gflop(run) if count else run()
        finally:
            episode_memory.parse_qa_pairs = original
    if count:
        return {"gflop_per_token": work / history[0]["completion_tokens"]}
    timed = history[1:] or history  # the first step warms up allocators and kernels
    return {"tokens_per_s": sum(h["completion_tokens"] for h in timed) / sum(h["step_seconds"] for h in timed),
            "update_s": sum(h["update_seconds"] for h in timed) / len(timed)}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def trl_run(model_fn, tokenizer, args) -> float:
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    user = f"Text:\n{STREAM[1]}\n\nQuestion: {QUESTION}"
    data = Dataset.from_list([{"prompt": answer_messages(user)} for _ in range(64)])
    reward = lambda completions, **_: [(hash(str(c)) % 1000) / 1000.0 for c in completions]  # noqa: E731
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        cfg = TRLConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.questions * args.generations,
                        num_generations=args.generations, max_completion_length=args.completion,
                        learning_rate=1e-6, report_to=[], logging_steps=1, save_strategy="no", beta=0.0,
                        use_cpu=not args.device.startswith("cuda"), bf16=args.dtype == "bfloat16", seed=0)
        trainer = TRLTrainer(model=model_fn(), reward_funcs=reward, args=cfg, train_dataset=data,
                             processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    timed = timer.times[1:] or timer.times
    tokens = args.questions * args.generations * args.completion
    return tokens * len(timed) / sum(timed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the random model")
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--decoder", default="generate", choices=["generate", "static"],
                        help="tmem_rl's decoding path (EpisodeConfig.decoder)")
    args = parse_args(parser, QUICK, argv)

    config = SHAPES[args.shape]()
    config.num_hidden_layers = args.layers
    tokenizer = load_tokenizer(FIXTURE_TOKENIZER)
    tokenizer.padding_side = "left"

    def model_fn():
        torch.manual_seed(0)
        with torch.device(args.device):  # built where it runs, for both systems
            return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))

    results = {"shape": args.shape, "layers": args.layers, "questions": args.questions,
               "generations": args.generations, "completion_tokens": args.completion, "pairs": args.pairs,
               "device": args.device, "dtype": args.dtype, "decoder": args.decoder, "threads": torch.get_num_threads(),
               "quick": args.quick}
    results["tmem_tokens_per_s"] = tmem_run(model_fn, tokenizer, args, extraction=False)["tokens_per_s"]
    results["fast_weights_off_tokens_per_s"] = tmem_run(model_fn, tokenizer, args, extraction=True,
                                                        fast_weights=False)["tokens_per_s"]
    on = tmem_run(model_fn, tokenizer, args, extraction=True)
    unshared = tmem_run(model_fn, tokenizer, args, extraction=True, shared_prompts=False)
    results["fast_weights_on_tokens_per_s"] = on["tokens_per_s"]
    results["unshared_prompts_tokens_per_s"] = unshared["tokens_per_s"]  # fast weights on, every segment whole
    results["update_s"], results["unshared_prompts_update_s"] = on["update_s"], unshared["update_s"]
    results["shared_prompts_update_speedup"] = unshared["update_s"] / on["update_s"]
    results["fast_weights_overhead"] = (results["fast_weights_off_tokens_per_s"]
                                        / results["fast_weights_on_tokens_per_s"])
    # The same ratio in work, free of timing noise: the time ratio it would be if every operation ran at one rate.
    for key, fast_weights, shared in (("fast_weights_off", False, True), ("fast_weights_on", True, True),
                                      ("unshared_prompts", True, False)):
        counted = tmem_run(model_fn, tokenizer, args, extraction=True, count=True, fast_weights=fast_weights,
                           shared_prompts=shared)
        results[f"{key}_gflop_per_token"] = counted["gflop_per_token"]
    results["fast_weights_work_overhead"] = (results["fast_weights_on_gflop_per_token"]
                                             / results["fast_weights_off_gflop_per_token"])
    # The update is the only part that differs: the step's work saved is the update's.
    results["shared_prompts_work_ratio"] = (results["unshared_prompts_gflop_per_token"]
                                            / results["fast_weights_on_gflop_per_token"])
    # TRL last: its trainer leaves process-wide settings behind that slow every later run here (measured)
    # and change what a later run computes (its counted work).
    results["trl_tokens_per_s"] = trl_run(model_fn, tokenizer, args)
    results["ratio_vs_trl"] = results["tmem_tokens_per_s"] / results["trl_tokens_per_s"]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
