"""`tmem-rl train` as torchrun's elastic agent starts it, with faults injected by attempt and rank (what
tests/test_cluster.py launches). TMEM_TEST_FAULTS: {"<attempt>": {"<rank>": [kind, step]}}, attempt being torchrun's
TORCHELASTIC_RESTART_COUNT; kinds:
  kill   SIGKILL in the middle of that step (after its rollouts, before its update)
  stall  sleep there for 10 minutes, as a hung process would (its start time goes to TMEM_TEST_DIR/stall-<attempt>)
  recipe+model  add the override given in place of the step to the command, and load slightly different
                weights: a rank launched with another recipe and model"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import tmem_rl.models
from tmem_rl.cli import main
from tmem_rl.trainers.grpo import GRPOTrainer


def varied(prompts, completions, **_):
    """A reward that differs within a group (the tiny model never answers right), so that the weights move."""
    return [len(c) % 3 / 2 for c in completions]


def inject_faults() -> None:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    fault = json.loads(os.environ.get("TMEM_TEST_FAULTS", "{}")).get(attempt, {}).get(os.environ.get("RANK", "0"))

    if fault and fault[0] in ("kill", "stall"):
        kind, at_step = fault
        update = GRPOTrainer.train_step

        def train_step(self, batch):
            if self.step + 1 == at_step:
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                (Path(os.environ["TMEM_TEST_DIR"]) / f"stall-{attempt}").write_text(str(time.time()))
                time.sleep(600)
            return update(self, batch)

        GRPOTrainer.train_step = train_step

    if fault and fault[0] == "recipe+model":
        import torch

        sys.argv.append(fault[1])
        load = tmem_rl.models.load_policy

        def load_policy(*args, **kwargs):
            model, tokenizer = load(*args, **kwargs)
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)
            return model, tokenizer

        tmem_rl.models.load_policy = load_policy


if __name__ == "__main__":
    inject_faults()
    sys.exit(main(sys.argv[1:]))
