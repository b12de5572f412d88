"""The LoCoMo recipe at the Qwen3-4B shape on one GPU: what a GRPO step costs, phase by phase, and where decoding
stands against the memory bandwidth.

A randomly initialised Qwen3-4B-shaped model (hidden 2560, intermediate 9728, 32 heads, 8 KV heads, head_dim 128,
vocab 151936, tied embeddings; fewer layers, see --layers) is built on the GPU, with the project's small
tokenizer (its token ids fit the larger vocab). Nothing is downloaded. Five parts, each timed, each catching its
own failure (the error is recorded and the next part runs):

- grpo: `--steps` GRPO steps of recipes/locomo_grpo_qwen3_4b.yaml's per-GPU batch (its 64 questions over 8
  processes: 8 questions x 8 rollouts, 64 fast-weight slots), with the recipe's L_max, completion budgets, inner
  loop, micro-batch size, fp32 weights under bf16 autocast and AdamW, through GRPOTrainer.generate_rollouts and
  train_step. Per phase: seconds (the device synchronised) and peak allocated memory (reset per phase): rollouts
  (split into extraction, inner update and answer from the trajectory timings), the old log-prob pass (only when
  num_iterations x num_mini_batches > 1), the loss forward, the backward, gradient clipping, the optimizer step.
  The environment is a synthetic conversation stream (grpo_step.BenchEnv, chunks of ~64 tokens) long enough for
  `--extractions` extractions of ~L_max tokens each; the parser is replaced as in grpo_step.py, so every
  extraction absorbs the recipe's max_pairs pairs. A random model almost never writes an end token: every
  completion runs to its budget, the worst case for time and memory.
- decode_bandwidth: the decode step of the full-depth model in bf16 (static decoder with CUDA graphs, and
  `model.generate`) at `--decode-rows` rows of an L_max context, against the bandwidth limit: the weights and the
  KV cache read once per step, over `--peak-bandwidth-tbs` and beside a device-to-device copy measured here.
- episode_cost, inner_update, grpo_step: those scripts as subprocesses with GPU flags (episodes at G 8 and 64 with
  the static decoder; the inner update against PEFT; a GRPO step against TRL); their JSON goes in as it came.

    python benchmarks/gpu_scale.py                           # about 8 minutes on one H200 (make bench-gpu)
    python benchmarks/gpu_scale.py --parts grpo --layers 12 --out gpu_scale.json
    python benchmarks/gpu_scale.py --quick                   # tiny model, CPU or GPU: the same code paths

Without a GPU and without --quick nothing runs: the JSON says why.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tmem_rl.episode.memory as episode_memory
from tmem_rl.episode.config import DEFAULT_L_MAX
from tmem_rl.models import FIXTURE_TOKENIZER, load_tokenizer
from tmem_rl.recipes import load_recipe
from tmem_rl.trainers.grpo import GRPOTrainer

from _quick import parse_args  # noqa: E402  (benchmarks/ is on the path when a script here runs)
from episode_cost import decode_step_comparison, stream_of  # noqa: E402
from grpo_step import BenchEnv, fixed_pairs  # noqa: E402
from inner_update import SHAPES  # noqa: E402
from run_all import BENCHMARKS_DIR, REPO_ROOT, machine_info, package_version, run_script  # noqa: E402

RECIPE = REPO_ROOT / "recipes" / "locomo_grpo_qwen3_4b.yaml"
RECIPE_PROCESSES = 8  # the recipe launches on 8 GPUs: each holds 1/8 of its questions
CHUNK_TOKENS = 64  # stream_of's chunks: a few turns of conversation
H200_TBS = 4.8

SUB_BENCHMARKS = ("episode_cost", "inner_update", "grpo_step")
PARTS = ("grpo", "decode_bandwidth", *SUB_BENCHMARKS)

# A tiny model of the same family with the real vocabulary (sampled ids beyond the tokenizer's occur as on the GPU),
# 4 layers to hold the 4 adapted ones; the sub-benchmarks' sizes are their own --quick ones.
QUICK = {"shape": "tiny", "layers": 4, "questions": 2, "generations": 2, "l_max": 256, "completion": 16,
         "decode_layers": 4, "decode_rows": [2], "decode_tokens": 8, "episode_layers": 4, "episode_rollouts": [1, 2],
         "inner_rollouts": 2, "grpo_step_layers": 2, "grpo_step_completion": 8}


def model_config(shape: str, layers: int | None):
    if shape == "tiny":
        config = AutoConfig.for_model("qwen3", vocab_size=151936, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      tie_word_embeddings=True, max_position_embeddings=40960)
    else:
        config = SHAPES[shape]()
    if layers:
        config.num_hidden_layers = layers
    return config


def build_model(config, device: str, dtype: torch.dtype):
    with torch.device(device):  # built where it runs: no random init of billions of weights on a CPU first
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def gib(num_bytes: float) -> float:
    return round(num_bytes / 2**30, 3)


class PhaseClock:
    """Seconds (summed) and peak allocated device memory (maxed) of named phases over all their calls. Each call
    synchronises the device at both ends and resets the peak, so phases must not nest."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.phases: dict[str, dict] = {}
        self.current: str | None = None  # still set after a phase raised: the error can name it

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.current = name
        started = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        entry = self.phases.setdefault(name, {"seconds": 0.0, "calls": 0, "peak_memory_gib": None})
        entry["seconds"] += time.perf_counter() - started
        entry["calls"] += 1
        if self.cuda:
            entry["peak_memory_gib"] = max(entry["peak_memory_gib"] or 0.0, gib(torch.cuda.max_memory_allocated()))
        self.current = None

    def wrap(self, owner, attribute: str, name: str) -> None:
        """Times every call of owner.attribute as phase `name` (an instance attribute shadows the method)."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def take(self) -> dict[str, dict]:
        phases, self.phases = self.phases, {}
        return phases


def recipe_overrides(args) -> list[str]:
    """The recipe's settings, cut to one process's share and to the sizes asked for."""
    overrides = [f"outer_loop.questions_per_step={args.questions}", f"outer_loop.num_generations={args.generations}",
                 f"outer_loop.max_steps={args.steps}", f"outer_loop.num_iterations={args.num_iterations}",
                 f"outer_loop.num_mini_batches={args.num_mini_batches}", "outer_loop.save_steps=0",
                 "outer_loop.report_to=[]", f"episode.decoder={args.decoder}"]
    if args.mixed_precision:
        overrides.append(f"outer_loop.mixed_precision='{args.mixed_precision}'")  # YAML reads a bare no as false
    if args.micro_batch_size:
        overrides.append(f"outer_loop.micro_batch_size={args.micro_batch_size}")
    if args.l_max:
        overrides.append(f"episode.l_max={args.l_max}")
    if args.completion:  # the budget every segment is capped at, extractions and answers alike
        overrides += [f"outer_loop.max_completion_length={args.completion}",
                      f"episode.max_extraction_tokens={args.completion}",
                      f"episode.max_answer_tokens={args.completion}"]
    return overrides


def grpo_part(args, device: str) -> dict:
    recipe = load_recipe(RECIPE, recipe_overrides(args))
    outer, episode = recipe.outer_loop, recipe.episode
    config = model_config(args.shape, args.layers)
    tokenizer = load_tokenizer(FIXTURE_TOKENIZER)
    # Every extraction reads about L_max tokens; half a window is left for the answer prompt.
    l_max = episode.l_max or DEFAULT_L_MAX
    chunks = stream_of(tokenizer, args.extractions * (l_max + CHUNK_TOKENS) + l_max // 2,
                       CHUNK_TOKENS)
    env = BenchEnv(chunks)
    clock = PhaseClock(device)
    result = {
        "recipe": str(RECIPE.relative_to(REPO_ROOT)), "recipe_overrides": recipe_overrides(args),
        "shape": args.shape, "layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
        "weights_dtype": recipe.model.dtype, "mixed_precision": outer.mixed_precision, "optimizer": outer.optim,
        "questions": outer.questions_per_step, "rollouts": outer.questions_per_step * outer.num_generations,
        "l_max": l_max, "max_completion_length": outer.max_completion_length,
        "max_extraction_tokens": min(episode.max_extraction_tokens, outer.max_completion_length),
        "max_answer_tokens": min(episode.max_answer_tokens, outer.max_completion_length),
        "pairs_per_extraction": episode.max_pairs, "micro_batch_size": outer.micro_batch_size,
        "num_iterations": outer.num_iterations, "num_mini_batches": outer.num_mini_batches,
        "decoder": episode.decoder,
        "environment": f"synthetic conversation stream (grpo_step.BenchEnv): {len(chunks)} chunks of ~{CHUNK_TOKENS} "
                       f"tokens, {sum(len(tokenizer(c, add_special_tokens=False)['input_ids']) for c in chunks)} "
                       "tokens; every extraction parses to max_pairs pairs drawn from the text",
        "completions": "random weights: almost no end token, every completion runs to its budget (the worst case "
                       "for time and memory)",
        "steps": [],
    }
    original_parser = episode_memory.parse_qa_pairs
    episode_memory.parse_qa_pairs = fixed_pairs(episode.max_pairs)
    try:  # a failure keeps the steps measured before it, and says where it happened
        with tempfile.TemporaryDirectory() as out:
            outer.output_dir = out
            with clock.phase("build_model"):
                model = build_model(config, device, recipe.model.torch_dtype)
            with clock.phase("build_trainer"):  # the fast weights' SVD init, 64 slots and the replay slots
                trainer = GRPOTrainer(outer, model, tokenizer, env, recipe.inner_loop, episode)
            result["setup"] = clock.take()
            result["parameters"] = sum(p.numel() for p in model.parameters())
            if device.startswith("cuda"):
                result["allocated_after_setup_gib"] = gib(torch.cuda.memory_allocated())
            clock.wrap(trainer, "_score_before_update", "old_logprobs")
            clock.wrap(trainer, "_chunk_loss", "loss_forward")
            clock.wrap(trainer, "_backward", "backward")
            clock.wrap(trainer.accelerator, "clip_grad_norm_", "grad_clip")
            clock.wrap(trainer.optimizer, "step", "optimizer_step")
            decoder = trainer.runner.sampler.static_decoder
            if decoder is not None:  # splits each call into prefill and decode steps
                decoder.timed = True
            for step in range(outer.max_steps):
                result["steps"].append(grpo_step_record(trainer, clock, step, device))
                print(json.dumps({"grpo_step": result["steps"][-1]}), flush=True)
    except Exception as error:  # noqa: BLE001
        where = clock.current or "between phases"
        if "setup" in result:
            where = f"step {len(result['steps']) + 1}, {where}"
            result["phases_of_failed_step"] = clock.take()
        result["error"] = f"{where}: {error_line(error)}"
        if device.startswith("cuda"):
            result["peak_memory_gib_at_error"] = gib(torch.cuda.max_memory_allocated())
    finally:
        episode_memory.parse_qa_pairs = original_parser
    if result["steps"]:  # the last: the first step also warms up kernels and the allocator
        result["seconds_per_step"] = result["steps"][-1]["seconds"]
        result["tokens_per_s"] = result["steps"][-1]["tokens_per_s"]
    peaks = [p["peak_memory_gib"] for s in result["steps"] for p in s["phases"].values() if p["peak_memory_gib"]]
    result["peak_memory_gib"] = max(peaks, default=None)
    return result


def grpo_step_record(trainer: GRPOTrainer, clock: PhaseClock, step: int, device: str) -> dict:
    decoder = trainer.runner.sampler.static_decoder
    if decoder is not None:
        decoder.calls = []
    with clock.phase("rollout"):
        batch = trainer.generate_rollouts(step)
    started = time.perf_counter()
    metrics = trainer.train_step(batch)
    train_seconds = time.perf_counter() - started
    phases = clock.take()
    if trainer.updates_per_step == 1:  # the pass returned at once: the loss's own log-probs are the old ones
        phases.pop("old_logprobs")
    first = batch.trajectories[0]  # lockstep: every rollout's timings are the batch's
    split = {f"{k}_s": first.timings.get(k, 0.0) for k in ("generate_extraction", "inner_update", "generate_answer")}
    split["other_s"] = phases["rollout"]["seconds"] - sum(split.values())  # reading, prompts, parsing, snapshots
    if decoder is not None:
        split["prefill_s"] = sum(c["prefill_seconds"] for c in decoder.calls)
        split["decode_s"] = sum(c["decode_seconds"] for c in decoder.calls)
        split["decode_steps"] = sum(c["decode_steps"] for c in decoder.calls)
    phases["rollout"].update(split)
    phases["train_step_other"] = {"seconds": train_seconds - sum(p["seconds"] for k, p in phases.items()
                                                                 if k != "rollout"),
                                  "calls": 1, "peak_memory_gib": None}  # rewards, advantages, metrics
    seconds = phases["rollout"]["seconds"] + train_seconds
    record = {
        "step": step + 1, "seconds": seconds, "train_step_seconds": train_seconds,
        "completion_tokens": metrics["completion_tokens"], "tokens_per_s": metrics["completion_tokens"] / seconds,
        "extractions_per_rollout": len(first.extractions), "pairs_absorbed": metrics["pairs_absorbed"],
        **{k: metrics[k] for k in ("extraction_length_mean", "extraction_clipped", "answer_length_mean",
                                   "answer_clipped", "inner_rollbacks", "loss", "grad_norm")},
        "old_logprob_pass": trainer.updates_per_step > 1,
        "phases": phases,
    }
    if device.startswith("cuda"):
        record["allocated_after_step_gib"] = gib(torch.cuda.memory_allocated())  # weights, fast weights, AdamW
    return record


def decode_bandwidth_part(args, device: str) -> dict:
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 matrix products on a CPU are slow, not informative
    config = model_config(args.shape, args.decode_layers)
    model = build_model(config, device, dtype).eval()
    tokenizer = load_tokenizer(FIXTURE_TOKENIZER)
    context = args.l_max or load_recipe(RECIPE).episode.l_max or DEFAULT_L_MAX
    result = {"shape": args.shape, "layers": config.num_hidden_layers, "dtype": str(dtype).removeprefix("torch."),
              "context_tokens": context, "decode_tokens": args.decode_tokens, "rows": []}
    if cuda:
        result["peak_bandwidth_tbs"] = args.peak_bandwidth_tbs
    else:
        result["peak_bandwidth"] = "skipped: a GPU's figure; on a CPU only the bytes per second reached are measured"
    for rows in args.decode_rows:
        row = decode_step_comparison(model, tokenizer, rows, context, args.decode_tokens)
        step_bytes = (row["weights_gib"] + row["kv_read_gib"]) * 2**30
        row["bytes_per_step_gb"] = step_bytes / 1e9
        for kind in ("static", "generate"):
            reached = step_bytes / (row[f"{kind}_decode_step_ms"] / 1000) / 1e9
            row[f"{kind}_reached_gbs"] = reached
            if cuda:
                row[f"{kind}_fraction_of_peak"] = reached / (args.peak_bandwidth_tbs * 1000)
        if cuda:
            row["peak_limit_ms"] = 1000 * step_bytes / (args.peak_bandwidth_tbs * 1e12)
        result["rows"].append(row)
        print(json.dumps({"decode_bandwidth": row}), flush=True)
    if cuda:  # graphs replay on a GPU only
        result["graphs"] = True
    else:
        result["graphs"] = "skipped: CUDA graphs need a GPU; the static decoder ran its steps eagerly"
    return result


def sub_benchmark_args(name: str, args) -> list[str]:
    sizes = {
        "episode_cost": ["--num-layers", str(args.episode_layers), "--rollouts", *map(str, args.episode_rollouts),
                         "--multiples", "1", "--decode-rows", str(max(args.episode_rollouts))],
        "inner_update": ["--rollouts", str(args.inner_rollouts)],
        "grpo_step": ["--layers", str(args.grpo_step_layers), "--completion", str(args.grpo_step_completion)],
    }[name]
    if args.quick:  # their own smallest model and device; the sizes still pass through the same flags
        return ["--quick", *sizes]
    return ["--shape", "qwen3-4b", "--device", "cuda", "--dtype", "bfloat16", *sizes]


def error_line(error: Exception) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0][:300] if message else ''}"


def run_part(name: str, args, device: str) -> dict:
    started = time.perf_counter()
    if name in SUB_BENCHMARKS:
        entry = run_script(BENCHMARKS_DIR / f"{name}.py", sub_benchmark_args(name, args), args.timeout)
        if entry["status"] != "ok":
            entry["error"] = (entry["stderr_tail"] or [entry["status"]])[-1]
        return entry
    try:
        entry = {"grpo": grpo_part, "decode_bandwidth": decode_bandwidth_part}[name](args, device)
    except Exception as error:  # noqa: BLE001  (one part's failure must not cost the others)
        entry = {"error": error_line(error)}
    finally:
        gc.collect()  # the part's model and trainer: the next part needs the memory
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    entry["seconds"] = time.perf_counter() - started
    return entry


def machine() -> dict:
    info = machine_info()
    info.update(cuda=torch.version.cuda, accelerate=package_version("accelerate"), trl=package_version("trl"))
    if torch.cuda.is_available():
        info["gpu_memory_gib"] = gib(torch.cuda.get_device_properties(0).total_memory)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here, rewritten after each part")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per sub-benchmark subprocess")
    group = parser.add_argument_group("grpo")
    group.add_argument("--shape", choices=["qwen3-4b", "tiny"], default="qwen3-4b")
    group.add_argument("--layers", type=int, default=8, help="decoder layers (Qwen3-4B has 36): what fits the time")
    group.add_argument("--questions", type=int, default=64 // RECIPE_PROCESSES, help="questions per step")
    group.add_argument("--generations", type=int, default=8, help="rollouts per question")
    group.add_argument("--steps", type=int, default=2)
    group.add_argument("--extractions", type=int, default=2, help="extractions per episode the stream is sized for")
    group.add_argument("--l-max", type=int, default=None, help="default: the recipe's (4096)")
    group.add_argument("--completion", type=int, default=None,
                       help="budget of every extraction and answer (default: the recipe's, 1024)")
    group.add_argument("--micro-batch-size", type=int, default=None, help="default: the recipe's (4)")
    group.add_argument("--num-iterations", type=int, default=1, help=">1 adds the old log-prob pass")
    group.add_argument("--num-mini-batches", type=int, default=1, help=">1 adds the old log-prob pass")
    group.add_argument("--decoder", choices=["generate", "static"], default="generate",
                       help="rollout decoding (the recipe's: generate)")
    group.add_argument("--mixed-precision", choices=["no", "bf16"], default=None,
                       help="default: the recipe's (bf16); --quick on a CPU: no")
    group = parser.add_argument_group("decode_bandwidth")
    group.add_argument("--decode-layers", type=int, default=None, help="default: the full model's (36)")
    group.add_argument("--decode-rows", type=int, nargs="+", default=[8, 64])
    group.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed")
    group.add_argument("--peak-bandwidth-tbs", type=float, default=H200_TBS, help="the GPU's peak (H200: 4.8)")
    group = parser.add_argument_group("sub-benchmarks")
    group.add_argument("--episode-layers", type=int, default=12, help="episode_cost.py --num-layers")
    group.add_argument("--episode-rollouts", type=int, nargs="+", default=[8, 64], help="episode_cost.py --rollouts")
    group.add_argument("--inner-rollouts", type=int, default=8, help="inner_update.py --rollouts")
    group.add_argument("--grpo-step-layers", type=int, default=12, help="grpo_step.py --layers")
    group.add_argument("--grpo-step-completion", type=int, default=64, help="grpo_step.py --completion")
    args = parse_args(parser, QUICK, argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick and device == "cpu" and args.mixed_precision is None:
        args.mixed_precision = "no"  # bf16 autocast made the quick run's backward 8x slower on a CPU (measured)
    results = {"quick": args.quick, "device": device, "machine": machine(), "parts": args.parts}
    if device == "cpu" and not args.quick:
        results["skipped"] = "no CUDA device: the full form needs a GPU (--quick runs the same code on a CPU)"
        print(json.dumps(results))
        return
    started = time.perf_counter()
    for name in args.parts:
        print(f"gpu_scale: {name} ...", file=sys.stderr, flush=True)
        results[name] = run_part(name, args, device)
        results["failed"] = [p for p in args.parts if p in results and results[p].get("error")]
        results["seconds"] = time.perf_counter() - started
        print(f"gpu_scale: {name} done in {results[name]['seconds']:.1f} s"
              + (f" ({results[name]['error']})" if results[name].get("error") else ""), file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
