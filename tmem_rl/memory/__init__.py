"""Fast weights (parametric memory learned inside one episode) and their inner update."""

from tmem_rl.memory.config import FastWeightConfig  # noqa: F401
from tmem_rl.memory.fast_weights import FastWeights, svd_init  # noqa: F401
from tmem_rl.memory.layers import find_target_modules  # noqa: F401
