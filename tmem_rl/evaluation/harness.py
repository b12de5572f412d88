"""`tmem-rl eval`: every memory method on the same model and questions; JSONL records, resume, summary, table, chart.

Output folder:
    config.json      every setting the run used
    results.jsonl    one record per (method, question), appended and fsynced as answers come in
    summary.json     per method: n, skipped, f1_by_category, f1_1_4, f1_1_5, em, seconds_per_episode
    summary.md       the same as a markdown table
    f1_by_category.png
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tmem_rl.envs import make_env
from tmem_rl.envs.base import Task
from tmem_rl.metrics.locomo import CATEGORY_NAMES, aggregate
from tmem_rl.evaluation.methods import METHODS, Answered, MethodSettings
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.models import DEFAULT_MODEL, load_policy
from tmem_rl.rollout import EpisodeConfig, EpisodeRunner

EPISODE_UNITS = ("question", "conversation")
RESULTS = "results.jsonl"


@dataclass
class EvalConfig:
    data: str
    """Path to the benchmark file (LoCoMo: the official locomo10.json)."""
    out: str
    """Output folder."""
    env: str = "locomo"
    methods: list[str] = field(default_factory=lambda: ["tmem"])
    model: str = DEFAULT_MODEL
    max_questions: int | None = None
    per_category: int | None = None
    """First N questions of each category: a fixed subset with every category in it."""
    sample_ids: list[str] | None = None
    episode_unit: str = "question"
    """question: one episode per question, the question known while reading (the paper's protocol).
    conversation: one pass per conversation without the question, then all its questions answered from it."""
    greedy: bool = False
    resume: bool = False
    # The paper's LoCoMo inference settings.
    l_max: int = 4096
    max_extraction_tokens: int = 192
    max_answer_tokens: int = 50
    temperature: float = 0.4
    top_p: float = 0.9
    top_k: int = 10
    fast_weights: FastWeightConfig = field(default_factory=FastWeightConfig)
    methods_settings: MethodSettings = field(default_factory=MethodSettings)
    chat_template_kwargs: dict[str, Any] | None = None
    """Chat-template settings for every prompt (None: thinking off where the template has the switch)."""
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    seed: int = 0

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
        if self.episode_unit not in EPISODE_UNITS:
            raise ValueError(f"episode_unit={self.episode_unit!r}: expected one of {EPISODE_UNITS}")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Finished records; a torn last line (a crash mid-write) is cut off so that appends stay valid JSONL."""
    if not path.exists():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{path}: dropping an incomplete record at byte {good_bytes} (interrupted write)")
                break
            good_bytes += len(line)
    if good_bytes < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def to_record(method: str, unit: str, answered: Answered, env) -> dict[str, Any]:
    task = answered.task
    metrics = env.score(task, answered.prediction)
    meta = task.metadata
    return {
        "method": method,
        "episode_unit": unit,
        "sample_id": meta.get("sample_id", task.task_id),
        "question_id": meta.get("question_id", task.task_id),
        "category": meta.get("category"),
        "question": task.question,
        "gold": task.answers[0] if task.answers else "",
        "prediction": answered.prediction,
        "f1": metrics["f1"],
        "em": metrics["em"],
        "seconds": answered.seconds,
        **answered.extra,
    }


def episodes(env, unit: str, pending: list[Task], batch_size: int):
    """(readings, questions per reading) batches for the chosen episode unit."""
    if unit == "question":
        for begin in range(0, len(pending), batch_size):
            batch = pending[begin : begin + batch_size]
            yield batch, [[t] for t in batch]
        return
    wanted = {t.task_id for t in pending}
    for sample_id, tasks in env.questions_by_sample().items():
        todo = [t for t in tasks if t.task_id in wanted]
        if todo:
            stream = Task(task_id=sample_id, question="", chunks=tasks[0].chunks, answers=())
            yield [stream], [todo]


def run_eval(config: EvalConfig) -> dict[str, Any]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS
    if results_path.exists() and results_path.stat().st_size and not config.resume:
        raise FileExistsError(f"{results_path} already has results; pass --resume to continue, or another --out")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    selection = {"per_category": config.per_category} if config.per_category is not None else {}
    env = make_env(config.env, data=config.data, sample_ids=config.sample_ids, max_questions=config.max_questions,
                   seed=config.seed, **selection)
    tasks = env.tasks()
    done = {(r["method"], r["question_id"]) for r in read_records(results_path)}

    model, tokenizer = load_policy(config.model, device=config.device)
    settings = config.methods_settings
    fast = FastWeights(model, settings.answer_batch_size, config.fast_weights)
    runner = EpisodeRunner(model, tokenizer, fast, EpisodeConfig(
        l_max=config.l_max, max_extraction_tokens=config.max_extraction_tokens,
        max_answer_tokens=config.max_answer_tokens, do_sample=not config.greedy,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, seed=config.seed,
        chat_template_kwargs=config.chat_template_kwargs,
    ))
    for method_name in config.methods:
        method = METHODS[method_name](runner, env, settings)
        pending = [t for t in tasks if (method_name, t.metadata.get("question_id", t.task_id)) not in done]
        bar = tqdm(total=len(pending), desc=method_name, unit="q", dynamic_ncols=True)
        for readings, questions in episodes(env, config.episode_unit, pending, settings.answer_batch_size):
            answered = method.run(readings, questions)
            records = [to_record(method_name, config.episode_unit, a, env) for group in answered for a in group]
            append_records(results_path, records)
            bar.update(len(records))
        bar.close()
    fast.remove()
    return write_reports(out, config.methods, len(getattr(env, "skipped", [])))


def write_reports(out: Path, methods: list[str], skipped: int) -> dict[str, Any]:
    records = read_records(out / RESULTS)
    summary = {}
    for method in methods:
        summary[method] = {**aggregate([r for r in records if r["method"] == method]), "skipped": skipped}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown_table(summary) + "\n")
    plot_categories(summary, out / "f1_by_category.png")
    return summary


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(summary: dict[str, Any]) -> str:
    cats = [f"{c} {CATEGORY_NAMES[c]}" for c in sorted(CATEGORY_NAMES)]
    head = ["method", "n", *cats, "F1 (1-4)", "F1 (1-5)", "EM", "s / episode"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summary.items():
        by_cat = [_fmt(s["f1_by_category"].get(str(c))) for c in sorted(CATEGORY_NAMES)]
        secs = "-" if s["seconds_per_episode"] is None else f"{s['seconds_per_episode']:.1f}"
        rows.append("| " + " | ".join([method, str(s["n"]), *by_cat, _fmt(s["f1_1_4"]), _fmt(s["f1_1_5"]),
                                       _fmt(s["em"]), secs]) + " |")
    return "\n".join(rows)


def plot_categories(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = sorted(CATEGORY_NAMES)
    width = 0.8 / max(len(summary), 1)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (method, s) in enumerate(summary.items()):
        values = [s["f1_by_category"].get(str(c)) or 0.0 for c in cats]
        ax.bar([c + (i - (len(summary) - 1) / 2) * width for c in cats], values, width, label=method)
    ax.set_xticks(cats, [f"{c}\n{CATEGORY_NAMES[c]}" for c in cats])
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("F1 by question category")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
