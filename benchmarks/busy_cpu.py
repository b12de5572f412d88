"""The CPU thread default on a quiet and on a busy machine: `tmem-rl demo` timed under each thread setting, alone and
next to competing processes that each keep one core busy.

    python benchmarks/busy_cpu.py                 # 4 demo episodes per run, the default model
    python benchmarks/busy_cpu.py --quick         # the tiny random model, 2 episodes

Settings: `default` (what tmem_rl chooses, tmem_rl.cpu: one thread per core that other processes leave free),
`all_cores` (torch's own default, one thread per core), `all_cores_passive` (the same with OMP_WAIT_POLICY=PASSIVE)
and `one_thread`; `--settings` picks some. The last line is a JSON object: seconds per setting and condition, each
setting's busy / quiet ratio, and the default's quiet time over torch's own default's when both ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _quick import parse_args  # noqa: E402

from tmem_rl.cpu import default_threads, usable_cores  # noqa: E402

_SPIN = "while True: pass"


def settings(cores: int) -> dict[str, dict[str, str]]:
    return {"default": {}, "all_cores": {"TMEM_RL_THREADS": str(cores)},
            "all_cores_passive": {"TMEM_RL_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"},
            "one_thread": {"TMEM_RL_THREADS": "1"}}


def timed_demo(args, extra_env: dict[str, str], out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "TMEM_RL_THREADS")}
    command = [sys.executable, "-m", "tmem_rl.cli", "demo", "--model", args.model, "--episodes", str(args.episodes),
               "--out", str(out)]
    started = time.perf_counter()
    subprocess.run(command, env={**env, **extra_env}, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--competitors", type=int, default=1, help="busy processes in the busy condition")
    parser.add_argument("--settings", nargs="+", default=list(settings(1)), choices=list(settings(1)))
    args = parse_args(parser, {"model": "tiny", "episodes": 2})
    cores = usable_cores()
    subprocess.run([sys.executable, "-m", "tmem_rl.cli", "convert", args.model], check=False, capture_output=True)
    seconds: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra_env in settings(cores).items():
            if name not in args.settings:
                continue
            seconds[name] = {"quiet": round(timed_demo(args, extra_env, Path(tmp) / name), 1)}
            print(f"{name} quiet: {seconds[name]['quiet']} s", flush=True)
            competitors = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(args.competitors)]
            try:
                seconds[name]["busy"] = round(timed_demo(args, extra_env, Path(tmp) / name), 1)
            finally:
                for process in competitors:
                    process.kill()
                    process.wait()
            print(f"{name} busy: {seconds[name]['busy']} s", flush=True)
    print(json.dumps({
        "quick": args.quick, "model": args.model, "episodes": args.episodes, "cores": cores,
        "quiet_default_threads": default_threads(cores), "competitors": args.competitors, "seconds": seconds,
        "busy_over_quiet": {name: round(s["busy"] / s["quiet"], 2) for name, s in seconds.items()},
        **({"default_quiet_over_all_cores_quiet": round(seconds["default"]["quiet"] / seconds["all_cores"]["quiet"], 3)}
           if {"default", "all_cores"} <= seconds.keys() else {}),
    }))


if __name__ == "__main__":
    main()
