"""Fast-weight settings. The defaults are the paper's; this is the one place they are written down."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

INITS = ("svd", "random")


@dataclass
class FastWeightConfig:
    rank: int = 6
    """LoRA rank r of each fast-weight delta B A."""
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    """Linear submodules (by last name component) of each adapted decoder layer."""
    num_layers: int = 4
    """Adapt the last `num_layers` decoder layers (ignored when `layers` is set)."""
    layers: tuple[int, ...] | None = None
    """Explicit decoder layer indices to adapt (negative counts from the end)."""
    init: str = "svd"
    """"svd": A = S_r V_r^T of the frozen weight, B = 0. "random": Kaiming-uniform A (standard LoRA), B = 0."""
    train_a: bool = False
    """Also train A, per rollout (ablation; the paper keeps A frozen)."""
    lr: float = 5e-4
    """Inner-loop SGD learning rate."""
    epochs: int = 5
    """Inner-loop passes over the pairs of one extraction."""
    batch_size: int = 16
    """Pairs per inner-loop SGD step, per rollout."""
    shuffle: bool = True
    """Shuffle pairs each epoch (seeded by `seed`, the rollout slot and its update count)."""
    prefix_cache: bool = True
    """Run the frozen layers below the first adapted one once per update and reuse their output every epoch."""
    shared_head: bool = True
    """With `prefix_cache`: the tokens every pair starts with (the chat template's head) run through the adapted
    layers once per slot and step instead of once per pair, and each pair's own tokens attend to them through the
    KV cache. The same losses and gradients, up to float rounding. It applies where the layers below the first
    adapted one keep the head in a plain KV cache of full-attention layers (not with layer 0 adapted, nor with
    sliding-window or recurrent layers) and an update has two pairs or more; otherwise every pair runs whole."""
    max_pair_tokens: int = 256
    """Truncate a formatted pair to this many tokens."""
    max_probe_leak: float | None = None
    """Collapse guard. After each absorb the slot answers six general questions no stream is about (greedy, a few
    tokens); if more than this share of its answers are empty, or start as an answer absorbed into the slot since
    its reset starts (in this absorb or an earlier one; first words sharing a stem of 4 letters, or all of a
    3-letter word, once normalised as the QA metrics do: "Melanin" after "Melanie", not "No" after "Noah"), where
    the base model's answer was not, the absorb is rolled back and recorded as such. None: no guard (the paper's
    inner loop)."""
    divergence_ratio: float | None = 2.0
    """Roll an absorb back when the slot's loss on its own pairs ends above this multiple of where it started
    (of 1.0 when it started lower; non-finite weights or losses always roll back). None: only non-finite."""
    seed: int = 0
    """Seeds the random init and the shuffling."""
    extra: dict = field(default_factory=dict)
    """Free-form notes carried into saved checkpoints (e.g. where the settings came from)."""

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        checks = {
            "rank": self.rank >= 1,
            "num_layers": self.num_layers >= 1,
            "init": self.init in INITS,
            "lr": self.lr > 0,
            "epochs": self.epochs >= 0,
            "batch_size": self.batch_size >= 1,
            "max_pair_tokens": self.max_pair_tokens >= 2,
            "target_modules": len(self.target_modules) > 0,
            "max_probe_leak": self.max_probe_leak is None or 0 <= self.max_probe_leak < 1,
            "divergence_ratio": self.divergence_ratio is None or self.divergence_ratio > 1,
        }
        for name, ok in checks.items():
            if not ok:
                expected = {"init": f"one of {INITS}", "divergence_ratio": "None or a number above 1",
                            "max_probe_leak": "None or a share in [0, 1)"}.get(name, "a positive value")
                raise ValueError(f"FastWeightConfig.{name}={getattr(self, name)!r}: expected {expected}")

    def to_dict(self) -> dict:
        return asdict(self)
