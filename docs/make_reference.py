"""Write docs/recipe_reference.md: every config field's type, default and docstring, one table per config.

    python docs/make_reference.py

The page is generated from the config dataclasses (`tmem_rl.config_docs.reference_markdown`); run this after
changing a config field or its docstring. tests/test_docs.py fails while the page is out of date.
"""

from pathlib import Path

from tmem_rl.config_docs import REFERENCE_FILE, reference_markdown

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    path = ROOT / REFERENCE_FILE
    path.write_text(reference_markdown())
    print(f"wrote {path.relative_to(ROOT)}")
