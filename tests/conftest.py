import os
from pathlib import Path

import pytest
import torch

from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny():
    """A fresh 4-layer random Llama with the default model's tokenizer."""
    return tiny_model(num_layers=4, tokenizer_path=FIXTURE_TOKENIZER)
