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
