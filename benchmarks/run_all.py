"""Run every benchmark in benchmarks/ and collect their results in one place.

Each script runs as its own process with this Python; the last line of its stdout is its JSON result. Writes
<out>/results.json (every script's JSON, seconds, exit status and command, plus the machine they ran on) after
each script, so an interrupted suite keeps what it measured, and <out>/results.md (one table of headline figures).
A script that fails is recorded with the end of its stderr, and the suite goes on; the exit status is 1 if any
failed.

    python benchmarks/run_all.py                       # the full suite (hours on 2 CPU cores)
    python benchmarks/run_all.py --quick               # every script with --quick: minutes
    python benchmarks/run_all.py --only inner_update grpo_step --timeout 600
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent  # scripts' relative defaults (e.g. runs/...) are relative to it

# The figures results.md shows per script (dotted paths reach into nested objects); a script not listed here
# shows its first few scalar top-level keys.
HEADLINES = {
    "inner_update": ["tmem_s", "speedup_vs_peft", "shared_head_speedup", "init_speedup_vs_full_svd"],
    "ablations": ["init.svd_steps", "init.random_steps", "supervision.facts.qa_pairs.f1",
                  "supervision.facts.transcript.f1"],
    "grpo_step": ["tmem_tokens_per_s", "ratio_vs_trl", "fast_weights_overhead", "fast_weights_work_overhead",
                  "shared_prompts_update_speedup"],
    "update_sharing": ["update_speedup", "work_ratio", "max_grad_difference"],
    "episode_cost": ["episodes.0.seconds_per_episode", "episodes.-1.seconds_per_episode",
                     "answer_sharing.prefill_speedup", "decode_step.static_decode_step_ms",
                     "decode_step.static_speedup_vs_generate"],
    "learning_curve": ["f1_before", "f1_after", "f1_delta", "minutes"],
    "retriever_qps": ["bm25s_qps_one_by_one", "rank_bm25_qps", "http_qps_batched", "bm25s_build_s"],
    "busy_cpu": ["busy_over_quiet.default", "busy_over_quiet.all_cores", "default_quiet_over_all_cores_quiet"],
    "gpu_scale": ["grpo.seconds_per_step", "grpo.peak_memory_gib", "decode_bandwidth.rows.-1.static_fraction_of_peak",
                  "failed"],
}
FALLBACK_HEADLINES = 4
STDERR_TAIL_LINES = 20


# Scripts here that are steps of a study rather than measurements: they take its output, not --quick.
STEPS = ("ship_extractor.py",)


def discover(scripts_dir: Path) -> dict[str, Path]:
    """Benchmark name -> script: every .py file except this runner, private helpers (a leading `_`) and STEPS."""
    return {path.stem: path for path in sorted(scripts_dir.glob("*.py"))
            if path.name != Path(__file__).name and not path.name.startswith("_") and path.name not in STEPS}


def machine_info() -> dict:
    import torch

    info = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if hasattr(os, "getloadavg"):  # other work on the machine slows every figure: record how busy it was
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def script_environment(quick: bool) -> dict[str, str]:
    env = dict(os.environ)
    if quick:
        # On a shared CPU, OpenMP threads that spin while waiting for a descheduled sibling made quick runs 4-9x
        # slower (measured at load 5 on 2 cores); passive waiting costs little when idle. Full runs keep the
        # library default that the documented figures were measured with.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_script(path: Path, extra_args: list[str], timeout: float | None, env: dict[str, str] | None = None) -> dict:
    """Runs one script and returns its entry for results.json."""
    command = [sys.executable, str(path), *extra_args]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        exit_status, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        exit_status, stdout, stderr = None, as_text(expired.stdout), as_text(expired.stderr)
    entry = {"command": shlex.join(map(repo_relative, command)), "seconds": round(time.perf_counter() - started, 2),
             "exit_status": exit_status}
    result = last_line_json(stdout)
    if exit_status is None:
        entry["status"] = f"timeout after {timeout:g} s"
    elif exit_status != 0:
        entry["status"] = f"failed (exit {exit_status})"
    elif result is None:
        entry["status"] = "failed (last stdout line is not a JSON object)"
    else:
        entry["status"] = "ok"
    if entry["status"] == "ok":
        entry["result"] = result
    else:
        entry["stderr_tail"] = stderr.splitlines()[-STDERR_TAIL_LINES:]
        entry["stdout_tail"] = stdout.splitlines()[-3:]
    return entry


def repo_relative(path: str) -> str:
    """Paths inside the repository as the repository sees them, so results read the same on every checkout."""
    try:
        return str(Path(path).relative_to(REPO_ROOT))
    except ValueError:
        return path


def as_text(output: bytes | str | None) -> str:
    """TimeoutExpired carries bytes even when the run asked for text."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def last_line_json(stdout: str) -> dict | None:
    lines = stdout.strip().splitlines()
    if not lines:
        return None
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def lookup(result: dict, dotted: str):
    """result["a"]["b"] for "a.b"; list items by index ("episodes.-1.x"); None where the path does not exist."""
    node = result
    for part in dotted.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                return None
        else:
            return None
    return node


def headline_keys(name: str, result: dict) -> list[str]:
    if name in HEADLINES:
        return HEADLINES[name]
    scalars = [k for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None]
    return scalars[:FALLBACK_HEADLINES]


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "—" if value is None else str(value)


def table_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(results: dict) -> str:
    machine = results["machine"]
    gpus = ", ".join(machine["gpus"]) or "no GPU"
    load = machine.get("load_average_at_start")
    lines = [
        "# Benchmark results",
        "",
        f"{machine['date']}: {machine['cpu']}, {machine['logical_cores']} logical cores "
        f"({machine['torch_threads']} torch threads), {gpus}; torch {machine['torch']}, "
        f"transformers {machine['transformers']}, Python {machine['python']}"
        + (f"; load average at start {' / '.join(map(str, load))}" if load else "")
        + (f"; OMP_WAIT_POLICY={machine['omp_wait_policy']}" if machine.get("omp_wait_policy") else "")
        + (" (quick run)" if results.get("quick") else ""),
        "",
        "| benchmark | status | seconds | headline figures |",
        "|---|---|---|---|",
    ]
    for name, entry in results["benchmarks"].items():
        if entry["status"] == "ok":
            figures = ", ".join(f"{key} {format_value(lookup(entry['result'], key))}"
                                for key in headline_keys(name, entry["result"]))
        else:
            figures = (entry["stderr_tail"] or ["(no stderr)"])[-1]
        lines.append(f"| {name} | {table_cell(entry['status'])} | {entry['seconds']:.1f} | {table_cell(figures)} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(results))


def run_suite(scripts: dict[str, Path], out_dir: Path, quick: bool = False, timeout: float | None = None) -> dict:
    """Runs `scripts` (name -> path) one after another, rewriting the results after each."""
    env = script_environment(quick)
    results = {"machine": machine_info(), "quick": quick, "benchmarks": {}}
    results["machine"]["omp_wait_policy"] = env.get("OMP_WAIT_POLICY")  # None: the OpenMP library's default
    extra_args = ["--quick"] if quick else []
    for position, (name, path) in enumerate(scripts.items(), 1):
        print(f"[{position}/{len(scripts)}] {name} ...", file=sys.stderr, flush=True)
        entry = run_script(path, extra_args, timeout, env)
        results["benchmarks"][name] = entry
        print(f"[{position}/{len(scripts)}] {name}: {entry['status']} in {entry['seconds']:.1f} s",
              file=sys.stderr, flush=True)
        write(results, out_dir)
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write(results, out_dir)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks (e.g. inner_update)")
    parser.add_argument("--out", type=Path, default=BENCHMARKS_DIR,
                        help="folder for results.json and results.md (default: benchmarks/)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="limit per script")
    args = parser.parse_args(argv)
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout:g}")
    scripts = discover(BENCHMARKS_DIR)
    if args.only:
        unknown = [name for name in args.only if name not in scripts]
        if unknown:
            parser.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(scripts)})")
        scripts = {name: scripts[name] for name in args.only}
    results = run_suite(scripts, args.out, args.quick, args.timeout)
    print(markdown(results))
    failed = [name for name, entry in results["benchmarks"].items() if entry["status"] != "ok"]
    # Like every benchmark: one JSON object as the last line of stdout.
    print(json.dumps({"results": str(args.out / "results.json"), "ok": len(results["benchmarks"]) - len(failed),
                      "failed": failed, "seconds": round(sum(e["seconds"] for e in results["benchmarks"].values()), 1)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
