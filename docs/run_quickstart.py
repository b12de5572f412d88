"""Run docs/quickstart.md as written, in a fresh clone of this repository, and stop at the first command that fails.

    python docs/run_quickstart.py                    # reuse this checkout's .venv (its packages; the clone's code)
    python docs/run_quickstart.py --fresh-install    # also `make demo` / `make test` in the clone, as a new user

Every ```bash and ```python block of the page runs in order, except a block preceded by `<!-- not run: why -->`
(alternatives shown side by side, which would contradict each other run in sequence). `git clone` / `cd` lines
are the clone this script makes; `source .venv/bin/activate` puts the venv first on the PATH. Without
`--fresh-install` the `make` lines are skipped: the clone's code runs on this checkout's installed packages. The
last line of stdout is a JSON object: each command, its exit status and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "quickstart.md"
_BLOCK = re.compile(r"(<!-- not run:[^>]*-->\s*)?```(bash|python)\n(.*?)```", re.S)


def quickstart_steps(text: str) -> list[tuple[str, str]]:
    """(kind, source) in page order: each bash line (continuations joined, comments dropped) or a python block."""
    steps = []
    for skip, kind, body in _BLOCK.findall(text):
        if skip:
            continue
        if kind == "python":
            steps.append(("python", body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                steps.append(("bash", command))
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh-install", action="store_true", help="run the make lines too (a new .venv)")
    parser.add_argument("--keep", action="store_true", help="leave the clone in place and print where it is")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="quickstart-"))
    clone = work / "tmem_rl"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = dict(os.environ)
    if not args.fresh_install:
        (clone / ".venv").symlink_to(ROOT / ".venv")
        env["PYTHONPATH"] = str(clone)  # the clone's code, ahead of this checkout's editable install
    results, ok = [], True
    for kind, source in quickstart_steps(PAGE.read_text()):
        if kind == "bash" and (source.startswith(("git clone", "cd ")) or
                               source.startswith("make ") and not args.fresh_install):
            continue
        if source.startswith("source .venv/bin/activate"):
            env["PATH"] = f"{clone / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
            env["VIRTUAL_ENV"] = str(clone / ".venv")
            continue
        command = ["bash", "-c", source] if kind == "bash" else [str(clone / ".venv" / "bin" / "python"), "-c", source]
        started = time.perf_counter()
        print(f"$ {source if kind == 'bash' else '<python block>'}", flush=True)
        run = subprocess.run(command, cwd=clone, env=env)
        results.append({"kind": kind, "command": source if kind == "bash" else source.splitlines()[0],
                        "rc": run.returncode, "seconds": round(time.perf_counter() - started, 1)})
        if run.returncode != 0:
            ok = False
            break
    if args.keep:
        print(f"clone kept at {clone}")
    else:
        subprocess.run(["rm", "-rf", str(work)])
    print(json.dumps({"ok": ok, "steps": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
