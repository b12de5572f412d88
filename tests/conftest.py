import os

import pytest
import torch

from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny():
    """A fresh 4-layer random Llama with the default model's tokenizer."""
    return tiny_model(num_layers=4, tokenizer_path=FIXTURE_TOKENIZER)
