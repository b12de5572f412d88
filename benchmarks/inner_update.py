"""Inner-update speed: tmem_rl's batched update vs a plain loop over PEFT LoRA adapters vs the compute floor of
an update that runs every pair whole (the shared head goes below it, so ratio_to_floor may be under 1).

Prints one JSON line with tmem_s, peft_loop_s, floor_s, speedup_vs_peft, ratio_to_floor; tmem_unshared_s and
shared_head_speedup (the same update with every pair run whole through the adapted layers: `shared_head` off, over
on) with the work of each (tmem_gflop, tmem_unshared_gflop: counted, so free of a shared CPU's noise); and init_s
(building the fast weights: the top-r SVD of every adapted matrix, done once per run, not per update) beside
full_svd_init_s (the same with a full SVD). All three updates train G rollouts' rank-r adapters on P QA pairs each
for E epochs (batch 16, SGD), on a randomly initialised model of the chosen shape built directly on the target
device (weights do not change the cost).

    python benchmarks/inner_update.py                       # SmolLM2-135M shape, CPU, G=8, P=16, E=5
    python benchmarks/inner_update.py --shape qwen3-4b --device cuda --dtype bfloat16
    python benchmarks/inner_update.py --quick               # 6 layers, G=2, P=4, E=2: seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.memory.inner_loop import answer_token_losses, collate_pairs
from tmem_rl.memory.layers import adapted_layer_indices, decoder_layers, linear_of
from tmem_rl.models import FIXTURE_TOKENIZER, load_tokenizer
from tmem_rl.records import QAPair

from _quick import parse_args  # noqa: E402  (benchmarks/ is on the path when a script here runs)

# Six layers keep the last four adapted ones behind a frozen prefix, as in the full shape.
QUICK = {"num_layers": 6, "rollouts": 2, "pairs": 4, "epochs": 2, "repeats": 1}

SHAPES = {
    "smollm2-135m": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
    ),
    "qwen3-4b": lambda: AutoConfig.for_model(
        "qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
        max_position_embeddings=40960,
    ),
}


def make_pairs(num_rollouts: int, num_pairs: int, seed: int = 0) -> dict[int, list[QAPair]]:
    rng = random.Random(seed)
    names = ["Maya", "Omar", "Lena", "Diego", "Priya", "Tomas", "Noor", "Emil"]
    things = ["city", "dog's name", "job", "birthday", "favourite number", "meeting place"]
    values = ["Lisbon", "Biscuit", "a pilot", "March 14", "forty-two", "the harbour cafe at noon"]
    return {
        g: [QAPair(f"What is {rng.choice(names)}'s {rng.choice(things)}?", rng.choice(values) + f" ({i})")
            for i in range(num_pairs)]
        for g in range(num_rollouts)
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, tokenizer caches
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def tmem_update(fast, tokenizer, pairs):
    fast.reset()
    fast.absorb(tokenizer, pairs)


def gflop(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def full_svd_init(fast) -> None:
    """What construction cost with a full SVD of every adapted matrix (the reference for init_s)."""
    for module in fast.modules.values():
        _, s, vh = torch.linalg.svd(linear_of(module).weight.float(), full_matrices=False)
        (s[: fast.config.rank, None] * vh[: fast.config.rank]).contiguous()


def peft_loop(model, tokenizer, pairs, cfg):
    """How a PEFT user trains one adapter per rollout: set the adapter, full forward with labels, SGD step."""
    layers = adapted_layer_indices(model, cfg)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, lora_dropout=0.0, target_modules=list(cfg.target_modules),
                      layers_to_transform=layers)
    peft_model = get_peft_model(model, lora, adapter_name="r0")
    for g in range(1, len(pairs)):
        peft_model.add_adapter(f"r{g}", lora)
    device = next(model.parameters()).device
    try:
        for g, rollout_pairs in pairs.items():
            peft_model.set_adapter(f"r{g}")
            params = [p for n, p in peft_model.named_parameters() if f"lora_B.r{g}." in n]
            opt = torch.optim.SGD(params, lr=cfg.lr)
            batch, _, _ = collate_pairs(tokenizer, {0: rollout_pairs}, cfg.max_pair_tokens, device)
            for _ in range(cfg.epochs):
                for start in range(0, len(rollout_pairs), cfg.batch_size):
                    rows = slice(start, start + cfg.batch_size)
                    loss = peft_model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                                      labels=batch.labels[rows]).loss
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
    finally:
        peft_model.unload()


class _Stop(Exception):
    pass


def floor(fast, tokenizer, pairs):
    """The least work an update needs when every pair runs whole through the adapted layers (no shared head): one
    no-grad pass up to the first adapted layer, then E epochs of the adapted layers' forward and backward, the LM
    head evaluated only at answer positions."""
    model, cfg = fast.model, fast.config
    fast.reset()
    device = next(model.parameters()).device
    batch, _, _ = collate_pairs(tokenizer, pairs, cfg.max_pair_tokens, device)
    layers = decoder_layers(model)
    first = adapted_layer_indices(model, cfg)[0]
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"], captured["kwargs"] = args[0], kwargs
        raise _Stop

    handle = layers[first].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    params = list(fast.trainable().values())
    for p in params:
        p.requires_grad_(True)
    try:
        with fast.use(batch.slots):
            for _ in range(cfg.epochs):
                h = captured["hidden"]
                for layer in layers[first:]:
                    out = layer(h, **captured["kwargs"])
                    h = out[0] if isinstance(out, tuple) else out
                h = model.get_decoder().norm(h)
                losses, _ = answer_token_losses(model.get_output_embeddings(), h, batch.labels)
                grads = torch.autograd.grad(losses.mean(), params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(cfg.lr * g)
    finally:
        for p in params:
            p.requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--num-layers", type=int, default=None, help="shrink the model to this many layers")
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-peft", action="store_true")
    args = parse_args(parser, QUICK, argv)

    config = SHAPES[args.shape]()
    if args.num_layers:
        config.num_hidden_layers = args.num_layers
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):  # built where it runs: no random init of billions of weights on a CPU first
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = load_tokenizer(FIXTURE_TOKENIZER)
    pairs = make_pairs(args.rollouts, args.pairs)
    cfg = FastWeightConfig(epochs=args.epochs, shuffle=False)
    results = {"shape": args.shape, "layers": config.num_hidden_layers, "device": args.device, "dtype": args.dtype,
               "rollouts": args.rollouts, "pairs_per_rollout": args.pairs, "epochs": args.epochs,
               "batch_size": cfg.batch_size, "threads": torch.get_num_threads(), "quick": args.quick}
    results["init_s"] = timed(lambda: FastWeights(model, args.rollouts, cfg).remove(), args.device, args.repeats)
    fast = FastWeights(model, args.rollouts, cfg)
    results["full_svd_init_s"] = timed(lambda: full_svd_init(fast), args.device, 1)
    results["init_speedup_vs_full_svd"] = results["full_svd_init_s"] / results["init_s"]
    results["tmem_s"] = timed(lambda: tmem_update(fast, tokenizer, pairs), args.device, args.repeats)
    results["floor_s"] = timed(lambda: floor(fast, tokenizer, pairs), args.device, args.repeats)
    results["ratio_to_floor"] = results["tmem_s"] / results["floor_s"]
    # The work itself, free of a shared CPU's noise: floating-point operations of one update each way.
    results["tmem_gflop"] = gflop(lambda: tmem_update(fast, tokenizer, pairs))
    fast.remove()
    unshared = FastWeights(model, args.rollouts, dataclasses.replace(cfg, shared_head=False))
    results["tmem_unshared_s"] = timed(lambda: tmem_update(unshared, tokenizer, pairs), args.device, args.repeats)
    results["shared_head_speedup"] = results["tmem_unshared_s"] / results["tmem_s"]
    results["tmem_unshared_gflop"] = gflop(lambda: tmem_update(unshared, tokenizer, pairs))
    unshared.remove()
    if not args.skip_peft:
        results["peft_loop_s"] = timed(lambda: peft_loop(model, tokenizer, pairs, cfg), args.device, 1)
        results["speedup_vs_peft"] = results["peft_loop_s"] / results["tmem_s"]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
