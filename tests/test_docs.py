"""Generated docs match their generators (the config reference, the concepts diagram), and doc links resolve."""

import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from tmem_rl.config_docs import (REFERENCE_COMMAND, REFERENCE_FILE, field_docs, reference_markdown,
                                 reference_sections, section_fields)

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_has_a_docstring():
    missing = [f"{section.cls.__module__}.{section.cls.__name__}.{f.name}"
               for section in reference_sections() for f in section_fields(section)
               if not field_docs(section.cls).get(f.name)]
    assert not missing, ("config fields without a docstring (write a one-line string literal under each):\n  "
                         + "\n  ".join(missing))


def test_recipe_reference_is_current():
    written = (ROOT / REFERENCE_FILE).read_text(encoding="utf-8")
    assert written == reference_markdown(), f"{REFERENCE_FILE} is out of date: run `{REFERENCE_COMMAND}`"


def _make_diagram():
    spec = importlib.util.spec_from_file_location("make_diagram", ROOT / "docs" / "make_diagram.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_concepts_diagram_is_current_and_well_formed():
    svg = _make_diagram().diagram()
    assert (ROOT / "docs" / "concepts.svg").read_text(encoding="utf-8") == svg, \
        "docs/concepts.svg is out of date: run `python docs/make_diagram.py`"
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "concepts.svg" in (ROOT / "docs" / "concepts.md").read_text(encoding="utf-8")


def test_relative_links_in_the_docs_resolve():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to files that do not exist:\n  " + "\n  ".join(broken)


def _quickstart_runner():
    spec = importlib.util.spec_from_file_location("run_quickstart", ROOT / "docs" / "run_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _doc_commands() -> list[tuple[str, str]]:
    """(page, command) for every `tmem-rl ...` line in the bash blocks of README.md and docs/."""
    module = _quickstart_runner()
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"<!-- not run:[^>]*-->", "", page.read_text(encoding="utf-8"))  # alternatives count here
        found += [(page.name, source) for kind, source in module.quickstart_steps(text)
                  if kind == "bash" and source.startswith("tmem-rl ")]
    return found


def test_every_documented_command_parses():
    """A flag renamed or removed in the CLI fails here, not in a new user's terminal."""
    import shlex

    from tmem_rl.cli import build_parser

    commands = _doc_commands()
    assert any("export" in c for _, c in commands) and any(" train " in f" {c} " for _, c in commands)
    parser = build_parser()
    wrong = []
    for page, command in commands:
        try:
            args, extra = parser.parse_known_args(shlex.split(command)[1:])
        except SystemExit:
            wrong.append(f"{page}: {command}")
            continue
        if [a for a in extra if not (args.command == "train" and "=" in a)]:
            wrong.append(f"{page}: {command} (unrecognized {extra})")
    assert not wrong, "documented commands the CLI rejects:\n  " + "\n  ".join(wrong)


def test_quickstart_runs_train_eval_export_and_the_agent_in_order():
    steps = _quickstart_runner().quickstart_steps((ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8"))
    order = [next(i for i, (_, s) in enumerate(steps) if marker in s)
             for marker in ("tmem-rl train recipes/quickstart_cpu.yaml", "tmem-rl eval", "tmem-rl export",
                            "TMEMAgent.from_pretrained")]
    assert order == sorted(order)
    assert not any("outer_loop.max_steps=2" in s for _, s in steps)  # the alternatives block is not run
