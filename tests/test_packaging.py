"""The built wheel must be self-contained: tiny_model() needs the tokenizer that ships inside the package."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
# Offline and quiet: the build uses the venv's setuptools/wheel instead of fetching them.
PIP_ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def pip(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=PIP_ENV, capture_output=True, text=True)
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), ".", cwd=ROOT)
    (path,) = out.glob("tmem_rl-*.whl")
    return path


def test_wheel_contains_tokenizer(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in TOKENIZER_FILES:
        assert f"tmem_rl/assets/tokenizer/{name}" in names


def test_installed_wheel_builds_tiny_model(wheel, tmp_path):
    site = tmp_path / "site"
    pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel))
    # cwd and PYTHONPATH keep the repo checkout (and its editable install) from shadowing the wheel's copy.
    code = "import tmem_rl, tmem_rl.models as m; m.tiny_model(num_layers=1); print(tmem_rl.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    imported = Path(proc.stdout.strip().splitlines()[-1]).resolve()
    assert imported.is_relative_to(site.resolve()), imported
