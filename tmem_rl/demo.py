"""The demo: TMEM episodes on the `facts` environment next to a no-memory agent, on a real model, on a CPU; then a
trained extractor that ships in the package (`tmem_rl.extractors`) beside the base model's extraction on the
trained one's held-out episodes.

The small default model's inner-loop settings differ from the paper's (which target 4B-8B models); they were
chosen by measurement, see docs/demo.md.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tmem_rl.cpu import configure_cpu_threads
from tmem_rl.errors import InputError
from tmem_rl.envs import make_env
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.models import DEFAULT_MODEL, load_policy
from tmem_rl.episode import EpisodeBatch, EpisodeConfig, EpisodeRunner
from tmem_rl.records import Supervision


@dataclass
class DemoConfig:
    model: str = DEFAULT_MODEL
    """A known name, an HF folder or a hub id."""
    episodes: int = 16
    """Facts episodes, all run as one lockstep batch per method."""
    l_max: int = 128
    """Working-context budget in tokens; the streams are about 3x longer."""
    num_facts: int = 5
    """Facts about the person in each stream, one of them asked."""
    num_distractors: int = 19
    """Unrelated dialogue lines mixed into each stream."""
    lines_per_chunk: int = 3
    """Dialogue lines per chunk the agent reads."""
    inner_lr: float = 1e-3
    """Inner-loop SGD learning rate (tuned for the 135M model; the paper's is 5e-4)."""
    inner_epochs: int = 20
    """Inner-loop epochs per extraction (the paper's is 5)."""
    seed: int = 0
    """Seeds the streams and the fast weights."""
    out: str = "runs/demo"
    """Trajectories and the summary go here."""
    extractor: str = "facts"
    """A shipped trained extractor to run beside the base model's extraction ("" for none); it runs only on the
    model it is an adapter of."""
    extractor_episodes: int = 16
    """Held-out episodes of the extractor's own environment, one lockstep batch per policy."""


def summarize(batch: EpisodeBatch, seconds: float) -> dict:
    trajs = batch.trajectories
    extractions = [e for t in trajs for e in t.extractions]
    parsed = [e for e in extractions if e.supervision.pairs]
    return {
        "f1": sum(t.metrics["f1"] for t in trajs) / len(trajs),
        "em": sum(t.metrics["em"] for t in trajs) / len(trajs),
        "extractions": len(extractions),
        "parse_rate": len(parsed) / len(extractions) if extractions else None,
        "pairs_per_extraction": sum(len(e.supervision.pairs) for e in extractions) / max(len(extractions), 1),
        "seconds_per_episode": seconds / len(trajs),
    }


def run_demo(config: DemoConfig) -> dict:
    if config.extractor:
        from tmem_rl.extractors import extractor_path

        extractor_path(config.extractor)  # an unknown name now, not after the first part has run
    if config.extractor_episodes < 1:
        raise InputError(f"--extractor-episodes {config.extractor_episodes}: expected at least 1")
    configure_cpu_threads()
    torch.manual_seed(config.seed)
    model, tokenizer = load_policy(config.model)
    env = make_env(
        "facts",
        num_tasks=config.episodes,
        num_facts=config.num_facts,
        num_distractors=config.num_distractors,
        lines_per_chunk=config.lines_per_chunk,
        seed=config.seed,
    )
    tasks = env.tasks()
    fast = FastWeights(model, len(tasks), FastWeightConfig(lr=config.inner_lr, epochs=config.inner_epochs))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for method, memory in (("tmem", "fast_weights"), ("no-memory", "none")):
        runner = EpisodeRunner(model, tokenizer, fast, EpisodeConfig(l_max=config.l_max, memory=memory,
                                                                     seed=config.seed))
        start = time.perf_counter()
        batch = runner.run(env, tasks)
        results[method] = summarize(batch, time.perf_counter() - start)
        with open(out / f"{method}.jsonl", "w") as f:
            for traj in batch.trajectories:
                f.write(json.dumps(traj.to_dict()) + "\n")
    fast.remove()
    stream_tokens = [sum(len(tokenizer(c)["input_ids"]) for c in t.chunks) for t in tasks]
    summary = {
        "config": config.__dict__,
        "stream_tokens_mean": sum(stream_tokens) / len(stream_tokens),
        "results": results,
    }
    if config.extractor:
        summary["extractor"] = compare_extractors(config, model, tokenizer, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def written(supervision: Supervision) -> str:
    """An extraction as a reader wants it: its pairs, one per line, or what the model wrote when none parsed."""
    if supervision.pairs:
        return "\n".join(f"  Q: {p.instruction}  A: {p.output}" for p in supervision.pairs)
    raw = supervision.attempts[-1].raw if supervision.attempts else ""
    return f"  (no pair parsed) {' '.join(raw.split())[:300]}"


def compare_extractors(config: DemoConfig, model, tokenizer, out: Path) -> dict:
    """The shipped extractor `config.extractor` and the base model (given the worked example it needs to write
    JSON) extracting from the same held-out episodes of the environment the extractor was trained on, greedy, each
    answering under its own fast weights."""
    from tmem_rl.agent import read_agent_settings
    from tmem_rl.envs.split import split_env
    from tmem_rl.extractors import extractor_info, extractor_path
    from tmem_rl.checkpoint_reader import load_trained_policy
    from tmem_rl.models import public_name

    folder, info = extractor_path(config.extractor), extractor_info(config.extractor)
    fast_config, episode, settings = read_agent_settings(folder)
    named = public_name(config.model)
    if settings.get("base_model") not in (config.model, named.tmem_name if named else None):
        return {"name": config.extractor, "skipped": f"an adapter of {settings.get('base_model')}, not of "
                                                     f"{config.model}"}
    spec = info["env"]
    split = "heldout" if spec["heldout_fraction"] else "all"
    env = split_env(make_env(spec["name"], **spec["kwargs"]), split, spec["heldout_fraction"], spec["split_seed"])
    tasks = env.tasks()[:config.extractor_episodes]
    greedy = dataclasses.replace(episode, do_sample=False, seed=config.seed)
    trained, _ = load_trained_policy(folder, base=config.model)
    results, texts = {}, {}
    for name, policy, episode_config, init_from in (
            ("base", model, dataclasses.replace(greedy, examples=True), None),
            ("trained", trained, greedy, folder)):
        fast = FastWeights(policy, len(tasks), fast_config, init_from=init_from)
        start = time.perf_counter()
        batch = EpisodeRunner(policy, tokenizer, fast, episode_config).run(env, tasks)
        results[name] = summarize(batch, time.perf_counter() - start)
        fast.remove()
        texts[name] = [written(e.supervision) for e in batch.trajectories[0].extractions]
        with open(out / f"extractor-{name}.jsonl", "w") as f:
            for traj in batch.trajectories:
                f.write(json.dumps(traj.to_dict()) + "\n")
    return {"name": config.extractor, "episodes": len(tasks), "results": results,
            "first_episode": {"stream": "\n".join(tasks[0].chunks),
                              "questions": [q.question for q in tasks[0].questions], "extractions": texts}}


def _rows(results: dict) -> list[str]:
    rows = ["| method | F1 | EM | extraction parse rate | pairs / extraction | s / episode |", "|---|---|---|---|---|---|"]
    for method, r in results.items():
        rate = "-" if r["parse_rate"] is None else f"{r['parse_rate']:.2f}"
        rows.append(f"| {method} | {r['f1']:.3f} | {r['em']:.3f} | {rate} | {r['pairs_per_extraction']:.1f} | "
                    f"{r['seconds_per_episode']:.1f} |")
    return rows


def format_table(summary: dict) -> str:
    rows = _rows(summary["results"])
    shipped = summary.get("extractor")
    if shipped and shipped.get("skipped"):
        rows += ["", f"Trained extractor {shipped['name']!r} not run: {shipped['skipped']}."]
    elif shipped:
        first = shipped["first_episode"]
        rows += ["", f"Trained extractor {shipped['name']!r} beside the base model, {shipped['episodes']} held-out "
                     "episodes of its environment (the base with a worked example):", ""]
        rows += _rows({f"tmem, {name} extraction": r for name, r in shipped["results"].items()})
        rows += ["", "First episode:", first["stream"], "", "Questions: " + " | ".join(first["questions"])]
        for name, extractions in first["extractions"].items():
            rows += ["", f"{name} extraction:", *extractions]
    return "\n".join(rows)
