"""The one-line docstrings written under config dataclass fields, read from the source (Python keeps no
attribute docstrings at run time). Used for `--help` texts and for the generated `docs/recipe_reference.md`
(`reference_markdown`; `python docs/make_reference.py` writes it)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import textwrap
from dataclasses import dataclass
from functools import lru_cache


def _class_body(klass: type) -> list[ast.stmt]:
    """The statements of a dataclass's source (none for other classes, or when the source is not available)."""
    if not dataclasses.is_dataclass(klass):
        return []
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
    except (OSError, TypeError, SyntaxError):
        return []


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring, whitespace folded} for the fields of dataclass `cls` that have one."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring wins over its base's
        body = _class_body(klass)
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


# ---- the recipe reference (docs/recipe_reference.md) -------------------------------------------------------------

REFERENCE_FILE = "docs/recipe_reference.md"
REFERENCE_COMMAND = "python docs/make_reference.py"


@dataclass(frozen=True)
class ConfigSection:
    """One table of the reference: a config class (only the fields it declares itself, when `own_fields_only`)
    and a line on where it is set."""

    title: str
    cls: type
    how: str
    own_fields_only: bool = False


def reference_sections() -> list[ConfigSection]:
    """Every user-facing config: a recipe's sections in its order, then evaluation, the demo and the warm start."""
    from tmem_rl.demo import DemoConfig
    from tmem_rl.evaluation.harness import EvalConfig
    from tmem_rl.evaluation.methods import MethodSettings
    from tmem_rl.memory import FastWeightConfig
    from tmem_rl.recipes import EnvSection, ModelSection, TrainRecipe
    from tmem_rl.episode import EpisodeConfig
    from tmem_rl.trainers.grpo import GRPOConfig
    from tmem_rl.trainers.ppo import PPOConfig
    from tmem_rl.trainers.warm_start import WarmStartConfig

    return [
        ConfigSection("Top level: TrainRecipe", TrainRecipe,
                      "The top-level keys of a recipe file for `tmem-rl train RECIPE` (`tmem_rl.recipes`). Any key "
                      "can be overridden on the command line by its dotted name: `tmem-rl train RECIPE "
                      "outer_loop.max_steps=2 env.kwargs.num_facts=3`."),
        ConfigSection("model: ModelSection", ModelSection, "The recipe's `model:` section."),
        ConfigSection("env: EnvSection", EnvSection,
                      "The recipe's `env:` section. `kwargs` are the environment class's own constructor "
                      "arguments: `tmem-rl envs list` names each environment's class; see "
                      "[environments.md](environments.md)."),
        ConfigSection("inner_loop: FastWeightConfig", FastWeightConfig,
                      "The recipe's `inner_loop:` section (`tmem_rl.memory.FastWeightConfig`): the fast weights "
                      "and their inner update; the defaults are the paper's. `tmem-rl eval` and `TMEMAgent` take "
                      "the same settings (`--recipe`, or a flag `--inner-<field>` each, e.g. `--inner-lr`; "
                      "`fast_weights=`)."),
        ConfigSection("episode: EpisodeConfig", EpisodeConfig,
                      "The recipe's `episode:` section (`tmem_rl.episode.EpisodeConfig`): how an episode reads, "
                      "acts, extracts and answers. In training, `outer_loop` sets the sampling (`temperature`, "
                      "`top_p`, `top_k`) and caps the generation budgets at `outer_loop.max_completion_length`. "
                      "`tmem-rl eval` takes them as `EvalConfig.episode` (a flag each: `--l-max`, `--max-pairs`, "
                      "...), `TMEMAgent` the reading fields (`episode=`; an export's `fast_weights.json`)."),
        ConfigSection("outer_loop: GRPOConfig", GRPOConfig,
                      "The recipe's `outer_loop:` section with `algorithm: grpo` "
                      "(`tmem_rl.trainers.grpo.GRPOConfig`); [training.md](training.md) describes a step."),
        ConfigSection("outer_loop with algorithm ppo: PPOConfig", PPOConfig,
                      "With `algorithm: ppo` the `outer_loop:` section is a `tmem_rl.trainers.ppo.PPOConfig`: "
                      "every GRPOConfig key above, and these, which it adds or gives another default.",
                      own_fields_only=True),
        ConfigSection("tmem-rl eval: EvalConfig", EvalConfig,
                      "Built by `tmem-rl eval` from its flags (`tmem-rl eval --help`), on top of a recipe's "
                      "settings with `--recipe`; in Python, `tmem_rl.evaluation.harness.run_eval(EvalConfig(...))`. "
                      "See [evaluation.md](evaluation.md)."),
        ConfigSection("tmem-rl eval: MethodSettings", MethodSettings,
                      "`EvalConfig.methods_settings` (`tmem_rl.evaluation.methods`); flags `--context-budget`, "
                      "`--retrieval-k` and `--answer-batch-size` (or `--batch-size`)."),
        ConfigSection("tmem-rl demo: DemoConfig", DemoConfig,
                      "Each field is a flag of `tmem-rl demo` (`--l-max`, `--inner-lr`, ...); `make demo` runs "
                      "the defaults. See [demo.md](demo.md)."),
        ConfigSection("Warm start: WarmStartConfig", WarmStartConfig,
                      "Python only: `tmem_rl.trainers.warm_start.warm_start(model, tokenizer, env, episode, "
                      "WarmStartConfig(...))`, supervised fine-tuning of the extraction action before RL; see "
                      "[training.md](training.md#warm-start-and-held-out-tasks)."),
    ]


def section_fields(section: ConfigSection) -> list[dataclasses.Field]:
    """The fields a section's table lists."""
    own = inspect.get_annotations(section.cls) if section.own_fields_only else None
    return [f for f in dataclasses.fields(section.cls) if own is None or f.name in own]


def reference_markdown() -> str:
    """docs/recipe_reference.md: a table per config of reference_sections(): field | type | default | meaning."""
    sections = reference_sections()
    anchors: dict[type, str] = {}
    for section in sections:
        anchors.setdefault(section.cls, _anchor(section.title))
    lines = [
        "# Recipe and config reference",
        "",
        f"<!-- Generated by {REFERENCE_COMMAND} from the config dataclasses; edit their field docstrings, not "
        "this file. -->",
        "",
        _prose("Generated from the config dataclasses: each field's name, type and default, and the docstring "
               "written under it. Do not edit this page by hand; after changing a config, regenerate it with "
               f"`{REFERENCE_COMMAND}` (`tests/test_docs.py` fails while it is out of date)."),
        "",
        _prose("Defaults are written as in a YAML recipe (`null`, `true`, `[a, b]`, `{key: value}`); a recipe sets "
               "only the keys it changes. See [training.md](training.md) for what a training step does, "
               "[concepts.md](concepts.md) for the ideas, and `recipes/` for worked recipes."),
        "",
    ]
    lines += [f"- [{section.title}](#{anchors[section.cls]})" for section in sections]
    for section in sections:
        docs = field_docs(section.cls)
        lines += ["", f"## {section.title}", "", _prose(section.how), "", "| field | type | default | meaning |",
                  "|---|---|---|---|"]
        for f in section_fields(section):
            cells = [f"`{f.name}`", f"`{_type_text(section.cls, f.name)}`", _default_text(section.cls, f, anchors),
                     docs.get(f.name, "")]
            lines.append("| " + " | ".join(_table_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _prose(text: str) -> str:
    return textwrap.fill(text, width=118, break_long_words=False, break_on_hyphens=False)


def _table_cell(text: str) -> str:
    """Markdown for one table cell: pipes escaped, and outside code spans "<" too (else `<output_dir>` reads as an
    HTML tag and vanishes)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def _anchor(title: str) -> str:
    """The id GitHub gives a markdown heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _type_text(cls: type, name: str) -> str:
    """A field's type as written in its class (the annotations are strings under `from __future__ import
    annotations`)."""
    for klass in cls.__mro__:
        annotations = inspect.get_annotations(klass)
        if name in annotations:
            hint = annotations[name]
            if isinstance(hint, str):
                return hint
            return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    return ""


def _default_text(cls: type, f: dataclasses.Field, anchors: dict[type, str]) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{_yaml_text(f.default)}`"
    if f.default_factory is dataclasses.MISSING:
        return "required"
    factory = f.default_factory
    if dataclasses.is_dataclass(factory):
        name = factory.__name__
        return f"[{name}](#{anchors[factory]})" if factory in anchors else f"`{name}()`"
    expression = _computed_default(cls, f.name)
    return f"`{expression}`" if expression is not None else f"`{_yaml_text(factory())}`"


def _computed_default(cls: type, name: str) -> str | None:
    """The source of a `default_factory=lambda: ...` that is not a literal (e.g. a device chosen by what the machine
    has): the page must read the same on every machine."""
    for klass in cls.__mro__:
        for node in _class_body(klass):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name):
                continue
            for keyword in node.value.keywords if isinstance(node.value, ast.Call) else []:
                if keyword.arg == "default_factory" and isinstance(keyword.value, ast.Lambda):
                    try:
                        ast.literal_eval(keyword.value.body)
                    except (ValueError, TypeError, SyntaxError):
                        return ast.unparse(keyword.value.body)
            return None
    return None


def _yaml_text(value) -> str:
    """A default as a recipe would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        import yaml

        try:
            plain = bool(value) and yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml_text(k)}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    return repr(value)
