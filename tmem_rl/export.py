"""`tmem-rl export`: a training checkpoint -> a model anyone can load.

    merged   a Hugging Face model folder: the trained weights (a LoRA run merged into its base at the adapter's
             own scale, lora_alpha / r), loadable with `AutoModelForCausalLM.from_pretrained`;
    adapter  a PEFT adapter folder (LoRA runs only), loadable with `AutoPeftModelForCausalLM.from_pretrained`
             (the base fetched by the name it gives) or `PeftModel.from_pretrained(base, folder)`.

Either way the folder also holds the tokenizer (with its chat template), a generation config whose end tokens
close a chat turn, `fast_weights.json` (the inner-loop and episode settings `TMEMAgent.from_pretrained` runs
with, chat-template settings included), the fast weights' A as training built it and a model card. Checkpoints of
single-process, DDP and DeepSpeed runs (ZeRO-3 shards consolidated with DeepSpeed's own converter) all export the
same way. An adapter names its base as other machines can load it (`tmem_rl.models.public_name`); a base without
such a name (`tiny`, a local-only folder) is refused for an adapter, as nothing else could load it. `verify`
reloads the export with plain transformers / PEFT and compares logits with the checkpoint's model, within what
fp32 rounding moves this model's logits (`verify_tolerance`), and the A an agent loads from the export with the
checkpoint's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from tmem_rl.checkpoint_reader import TrainedCheckpoint, _run_record, checkpoint_base, load_checkpoint
from tmem_rl.errors import InputError

FORMATS = ("merged", "adapter")
ADAPTER_DTYPES = ("float32", "bfloat16", "float16")
VERIFY_NOISE_FACTOR = 8
"""--verify's default tolerance, in units of the checkpoint's own rounding noise (see `verify_tolerance`)."""
# Text the logits are compared on: a chat turn and plain prose, so both the template tokens and words are covered.
VERIFY_MESSAGES = [
    [{"role": "user", "content": "Where does Maya live, and since when?"}],
    [{"role": "user", "content": "Summarise: the meeting moved to Tuesday because the room was booked."}],
]


@torch.no_grad()
def sample_logits(model, tokenizer) -> torch.Tensor:
    """Logits of the verification texts at their real (unpadded) tokens [tokens, V], in float64 (exact for any
    lower precision, so that differences are not rounded again)."""
    from tmem_rl.chat import chat_ids, chat_template_kwargs, left_padded

    kwargs = chat_template_kwargs(tokenizer)
    prompts = [chat_ids(tokenizer, m, kwargs, generation_prompt=True) for m in VERIFY_MESSAGES]
    input_ids, mask = left_padded(prompts, tokenizer.pad_token_id)
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    return logits[mask.bool()].to(torch.float64)


@torch.no_grad()
def rounding_noise(model, tokenizer, logits: torch.Tensor) -> float:
    """How far rounding in the model's own dtype moves its logits: max abs difference between `logits` (the model's
    `sample_logits`) and the same computed in float64. The model is converted in place and back, which is exact."""
    dtype = next(model.parameters()).dtype
    model.to(torch.float64)
    try:
        exact = sample_logits(model, tokenizer)
    finally:
        model.to(dtype)
    return (logits - exact).abs().max().item()


def verify_tolerance(noise: float, logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """The largest max abs logit difference --verify accepts by default.

    The export and the checkpoint compute the same function in `dtype` with operations in another order (a merged
    W + s B A against W and B A apart, or another kernel), so each lies within about `noise` of the float64 logits
    (`rounding_noise`: eps(dtype) times the logits' magnitude times how much this model's depth and width amplify
    a rounding, measured rather than guessed) and they lie up to ~2 x noise apart; rounding each merged weight to
    `dtype` once adds about as much again. Measured, the difference reached 0.9 x noise on the default model and at
    most 3.1 x over 32 random tiny LoRA models (the noise is a maximum over two prompts' tokens, itself a noisy
    estimate), so VERIFY_NOISE_FACTOR (8) leaves a margin of 2.5 over the worst seen. eps(dtype) x max |logit|, the
    rounding of the largest logit itself, is the floor when a model happens to show no noise."""
    floor = torch.finfo(dtype).eps * logits.abs().max().item()
    return VERIFY_NOISE_FACTOR * max(noise, floor)


def max_init_diff(expected: dict[str, torch.Tensor], model, fast_config, folder: Path) -> float:
    """Max abs difference between `expected` (the checkpoint's fast-weight A) and the A fast weights on `model`
    load from `folder`, as the agent builds them."""
    from tmem_rl.memory import FastWeights

    fast = FastWeights(model, 1, fast_config, init_from=folder)
    fast.remove()
    return max((a - expected[key]).abs().max().item() for key, a in fast.init_tensors().items())


def _model_card(trained: TrainedCheckpoint, fmt: str, eval_summary: dict | None, public,
                fit: dict | None = None) -> str:
    run = trained.run
    history = json.loads((trained.folder / "trainer_state.json").read_text()).get("history") or [{}]
    last = {k: v for k, v in history[-1].items() if isinstance(v, (int, float)) and not k.endswith("seconds")}
    keys = [k for k in ("reward_mean", "f1", "extraction_parse_rate", "pairs_absorbed", "inner_loss_after")
            if k in last]
    library = "peft" if fmt == "adapter" else "transformers"
    # The card's base_model is a hub id by the hub's convention: a base without one is named in the text only.
    base_text = public.note() if public else f"`{trained.base_model or 'unknown'}` (no public name)"
    lines = [
        "---",
        *([f"base_model: {public.hub_id}"] if public else []),
        f"library_name: {library}",
        "tags: [tmem_rl, parametric-memory, fast-weights]",
        "---",
        "",
        f"# {trained.folder.parent.name}/{trained.folder.name}",
        "",
        f"An extractor policy trained with tmem_rl ({run.get('algorithm', 'GRPO')}, {run.get('step', '?')} steps, "
        f"{'LoRA on the slow weights' if trained.is_adapter else 'all weights'}), exported as "
        f"{'a PEFT adapter' if fmt == 'adapter' else 'a merged model'}. Base model: {base_text}.",
        "",
        *([f"The run started from `{trained.base_model}`; this adapter carries that model's difference from the "
           f"base as well, as a LoRA of rank {fit['rank']} (truncated SVD of each layer's weight difference; the "
           f"largest share it leaves out of any layer's difference is {fit['max_residual']:.1e}, Frobenius).", ""]
          if fit else []),
        "Run it as an agent with parametric memory (the settings in `fast_weights.json`):",
        "",
        "```python",
        "from tmem_rl import TMEMAgent",
        "agent = TMEMAgent.from_pretrained(\"path/to/this/folder\")",
        "agent.read(long_text)",
        "print(agent.answer(\"...\"))",
        "```",
        "",
    ]
    if fmt == "adapter":
        lines += ["Or as a plain PEFT model (it loads its base by the name above; "
                  "`PeftModel.from_pretrained(base, folder)` takes a base you load yourself):", "",
                  "```python", "from peft import AutoPeftModelForCausalLM",
                  "model = AutoPeftModelForCausalLM.from_pretrained(\"path/to/this/folder\")", "```", ""]
    if keys:
        lines += ["## Training metrics (last step)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {last[k]:.4g} |" for k in keys] + [""]
    if eval_summary:
        from tmem_rl.evaluation.harness import markdown_table

        lines += ["## Evaluation", "", markdown_table(eval_summary), ""]
    if run.get("recipe"):
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(run["recipe"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _settings(trained: TrainedCheckpoint):
    from tmem_rl.memory import FastWeightConfig
    from tmem_rl.episode import EpisodeConfig

    run = trained.run
    try:
        fast = FastWeightConfig(**run.get("fast_weights", {}))
        episode = EpisodeConfig(**run.get("episode", {}))
    except (TypeError, ValueError) as err:
        raise InputError(f"checkpoint {trained.folder / 'run.json'}: unreadable settings ({err})") from None
    return fast, episode


def _refuse_unnamed_adapter(folder: Path, base_name: str) -> None:
    """An adapter is only of use on a base others can load: refuse one whose base has no public name."""
    from tmem_rl.models import TINY_MODEL

    if not base_name:
        raise InputError(f"checkpoint {folder}: its base model is not recorded; pass --base NAME_OR_FOLDER")
    if base_name == TINY_MODEL:
        why = "a random model tmem_rl builds in memory, which nothing else can load"
    elif Path(base_name).expanduser().exists():
        why = "a local folder that is neither a Hugging Face cache snapshot nor a converted known model"
    else:
        why = "neither a hub id, a known name nor a folder here"
    raise InputError(f"checkpoint {folder}: its base {base_name!r} has no public name ({why}), so an adapter of it "
                     "would load nowhere else; export --format merged (the whole model), or pass --base with the "
                     "hub id or known name of the same weights")


def _exported_files(out: Path) -> set[str]:
    """The files an earlier export wrote into `out`, as its fast_weights.json lists them."""
    from tmem_rl.agent import SETTINGS_FILE

    try:
        files = json.loads((out / SETTINGS_FILE).read_text()).get("files", [])
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return set()
    root = out.resolve()
    # Only paths inside `out`: the list is read from a file anyone may have edited.
    return {f for f in files if isinstance(f, str) and root in (out / f).resolve().parents}


def _install(staging: Path, out: Path) -> None:
    """Move the export from `staging` to `out`: a rename when `out` is absent or empty; else each file replaces
    its namesake, files an earlier export wrote and this one does not are removed, and any other file stays."""
    if not out.exists() or not any(out.iterdir()):
        if out.exists():
            out.rmdir()
        staging.rename(out)
        return
    written = {str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()}
    stale = _exported_files(out) - written
    for rel in sorted(written):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, out / rel)
    for rel in stale:
        (out / rel).unlink(missing_ok=True)


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str = "merged", verify: bool = False,
                      base: str | None = None, eval_summary: str | Path | None = None,
                      overwrite: bool = False, tolerance: float | None = None, adapter_of: str | None = None,
                      rank: int | None = None, adapter_dtype: str = "float32") -> dict:
    """Export a checkpoint; returns {"out", "format", "base_model" (as the export names it), "step", and with
    verify those of `verify_export`}. `tolerance`: None for `verify_tolerance`'s.

    `adapter_of`: write an adapter of this public base instead of the run's own (a run that started from a local
    fine-tune, such as a warm start): the trained model's difference from it, cut to `rank` by truncated SVD
    (`tmem_rl.lowrank.fit_lora`; None for the rank that keeps it whole), stored in `adapter_dtype`; the result
    then also holds "fit" (the rank and the residuals it left out)."""
    from tmem_rl.agent import SETTINGS_FILE, write_agent_settings
    from tmem_rl.chat import stop_token_ids
    from tmem_rl.memory import FastWeights
    from tmem_rl.memory.fast_weights import INIT_FILE
    from tmem_rl.models import KNOWN_MODELS, public_name

    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if adapter_of is not None and fmt != "adapter":
        raise InputError("--adapter-of: writes an adapter; pass --format adapter")
    if adapter_of is None and (rank is not None or adapter_dtype != "float32"):
        raise InputError("--rank / --adapter-dtype: shape an --adapter-of export; pass --adapter-of BASE")
    if rank is not None and rank < 1:
        raise InputError(f"--rank {rank}: expected at least 1")
    if adapter_dtype not in ADAPTER_DTYPES:
        raise InputError(f"--adapter-dtype {adapter_dtype!r}: expected one of {', '.join(ADAPTER_DTYPES)}")
    out = Path(out)
    source = Path(checkpoint).resolve()
    if out.resolve() == source or out.resolve() in source.parents:
        raise InputError(f"--out {out}: holds the checkpoint being exported; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: a file, expected a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out}: already exists and is not empty; choose another folder or pass --overwrite")
    summary = None
    if eval_summary is not None:
        try:
            summary = json.loads(Path(eval_summary).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise InputError(f"--eval {eval_summary}: not a readable summary.json ({err})") from None
    from tmem_rl.trainers.checkpoints import verified_checkpoint

    folder = verified_checkpoint(checkpoint)  # before loading anything: a bad checkpoint fails in a second
    if fmt == "adapter" and adapter_of is None and not (folder / "adapter" / "adapter_config.json").is_file():
        raise InputError(f"checkpoint {folder}: the run trained all weights (no LoRA adapter); use --format merged "
                         "or --adapter-of BASE")
    base_name = checkpoint_base(folder, _run_record(folder), base)
    public = public_name(base_name) if base_name else None
    if adapter_of is not None:
        public = public_name(adapter_of)
        if public is None:
            raise InputError(f"--adapter-of {adapter_of}: has no public name (a hub id or known name), so an "
                             "adapter of it would load nowhere else")
    elif fmt == "adapter" and public is None:
        _refuse_unnamed_adapter(folder, base_name)
    trained = load_checkpoint(folder, base)
    fast_config, episode_config = _settings(trained)
    tokenizer = trained.tokenizer
    reference = _reference(trained) if verify else None
    # The fast weights' A as training built it (checked against the model; recomputed, with a warning, from a
    # checkpoint written before it was saved): an agent recomputing it from the trained weights would get another.
    fast = FastWeights(trained.model, 1, fast_config, init_from=folder)
    fast.remove()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    fit = None
    try:
        model = trained.model
        if (fmt == "merged" or adapter_of is not None) and trained.is_adapter:
            # W + (lora_alpha / r) * B A by PEFT's own merge, summed in float64 so that each merged weight is the
            # float32 nearest the exact sum: one rounding per weight, as verify_tolerance counts.
            model = merged_in_float64(model)
        if adapter_of is not None:
            from tmem_rl.lowrank import fit_lora, linear_deltas
            from tmem_rl.models import load_policy

            other = load_policy(adapter_of, dtype=torch.float32)[0]
            deltas = linear_deltas(model, other, name=f"checkpoint {folder}")
            model, fit = fit_lora(other, deltas, rank, getattr(torch, adapter_dtype))
            fit["base"] = adapter_of
        generation = model.generation_config
        generation.eos_token_id = stop_token_ids(model, tokenizer)
        generation.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(str(staging))
        if fmt == "adapter":
            _name_adapter_base(staging, public)
            generation.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        if (folder / INIT_FILE).is_file():
            fast.save_init(staging)
        (staging / "README.md").write_text(_model_card(trained, fmt, summary, public, fit))
        # What TMEMAgent loads the exact base by, where training read it from, and every file written (so that
        # --overwrite replaces this export and nothing else).
        named = {"base_model": public.tmem_name if public else trained.base_model}
        if public and public.source:
            named["base_model_source"] = public.source
        files = sorted({str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()} | {SETTINGS_FILE})
        write_agent_settings(staging, fast_config, episode_config, **named, step=trained.run.get("step"),
                             export_format=fmt, files=files)
        _install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = {"out": str(out), "format": fmt, "base_model": public.hub_id if public else trained.base_model,
              "step": trained.run.get("step")}
    if fit is not None:
        result["fit"] = fit
    if fmt == "adapter" and public and public.tmem_name in KNOWN_MODELS:
        # --verify reloads onto the weights training ran on; plain PEFT, by the hub id, gets the original ones.
        result["note"] = (f"plain PEFT loads this adapter onto {public.hub_id}'s own weights, which differ by "
                          f"the quantisation from {public.tmem_name} (a GGUF dequantised to float32) that training "
                          "ran on; TMEMAgent and --verify load that exact base")
    if verify:
        result.update(_compare(reference, out, fmt, adapter_of or trained.base_model, fast.init_tensors(),
                               fast_config, tolerance, exact_init=(folder / INIT_FILE).is_file()))
    return result


def _reference(trained: TrainedCheckpoint) -> dict:
    """What an export of `trained` is checked against: its logits and their rounding noise, taken before export
    merges anything into the model."""
    logits = sample_logits(trained.model, trained.tokenizer)
    return {"logits": logits, "noise": rounding_noise(trained.model, trained.tokenizer, logits),
            "dtype": next(trained.model.parameters()).dtype, "tokenizer": trained.tokenizer}


def _compare(reference: dict, out: Path, fmt: str, base_model: str, init: dict[str, torch.Tensor], fast_config,
             tolerance: float | None, exact_init: bool) -> dict:
    reloaded = reload_export(out, fmt, base_model)
    logits = reference["logits"]
    logit_diff = (sample_logits(reloaded, reference["tokenizer"]) - logits).abs().max().item()
    init_diff = max_init_diff(init, reloaded, fast_config, out)
    if tolerance is None:
        tolerance = verify_tolerance(reference["noise"], logits, reference["dtype"])
        # A loaded from the file the export carries is the checkpoint's, up to at most one rounding; one an agent
        # recomputes (a checkpoint older than the file) is an SVD of other weights, held to the logits' tolerance.
        largest = max(a.abs().max().item() for a in init.values())
        eps = torch.finfo(reference["dtype"]).eps
        init_tolerance = VERIFY_NOISE_FACTOR * eps * largest if exact_init else tolerance
    else:
        init_tolerance = tolerance
    return {"max_logit_diff": logit_diff, "max_init_diff": init_diff, "noise": reference["noise"],
            "tolerance": tolerance, "verified": logit_diff <= tolerance and init_diff <= init_tolerance}


def verify_export(checkpoint: str | Path, out: str | Path, base: str | None = None,
                  tolerance: float | None = None) -> dict:
    """Check an export in `out` against the checkpoint it came from, as `export_checkpoint(verify=True)` does:
    returns {"max_logit_diff", "max_init_diff", "noise" (the checkpoint's rounding noise), "tolerance",
    "verified"}. `base`: the base an adapter export is loaded onto (default: the checkpoint's)."""
    from tmem_rl.memory import FastWeights
    from tmem_rl.memory.fast_weights import INIT_FILE

    out = Path(out)
    if not out.is_dir():
        raise InputError(f"export {out}: no such folder")
    trained = load_checkpoint(checkpoint)
    fast_config, _ = _settings(trained)
    fast = FastWeights(trained.model, 1, fast_config, init_from=trained.folder)
    fast.remove()
    fmt = "adapter" if (out / "adapter_config.json").is_file() else "merged"
    if base is None and fmt == "adapter":
        base = _named_base(out)  # an --adapter-of export is of another base than the checkpoint's
    return _compare(_reference(trained), out, fmt, base or trained.base_model, fast.init_tensors(), fast_config,
                    tolerance, exact_init=(trained.folder / INIT_FILE).is_file())


def _named_base(out: Path) -> str | None:
    """The base an export names in its fast_weights.json: the folder training loaded it from, else its name."""
    from tmem_rl.agent import SETTINGS_FILE

    try:
        settings = json.loads((out / SETTINGS_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    source = settings.get("base_model_source") if isinstance(settings, dict) else None
    if isinstance(source, str) and Path(source).exists():
        return source
    named = settings.get("base_model") if isinstance(settings, dict) else None
    return named if isinstance(named, str) and named else None


def merged_in_float64(peft_model):
    """PEFT's merge, one adapted layer at a time in float64 (a whole-model float64 copy would double memory)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.to(torch.float64)
            module.merge()
            module.to(torch.float32)
    return peft_model.unload()  # the merged base layers, the LoRA modules removed


def _name_adapter_base(folder: Path, public) -> None:
    """Name the base in adapter_config.json as plain PEFT loads it anywhere: its hub id (and commit, if known)."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = public.hub_id
    if public.revision:
        config["revision"] = public.revision  # AutoPeftModel loads the base at this commit
    path.write_text(json.dumps(config, indent=2))


def reload_export(out: Path, fmt: str, base_model: str):
    """The export as a user loads it: plain transformers for a merged model, base + PEFT for an adapter (the base
    from `base_model`, the exact weights training ran on, where a user's PEFT may fetch them by hub id)."""
    from transformers import AutoModelForCausalLM

    if fmt == "merged":
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    else:
        from peft import PeftModel

        from tmem_rl.models import load_policy

        model = PeftModel.from_pretrained(load_policy(base_model, dtype=torch.float32)[0], str(out))
    return model.eval()
