"""Chat rendering shared by everything that builds a prompt: extraction, answering and the inner loop's pairs.

One function renders messages to token ids with the same chat-template settings everywhere, so that what the inner
loop trains on has exactly the shape of what the agent generates from.
"""

from __future__ import annotations

import re

import torch

THINKING_SWITCH = "enable_thinking"
# Reasoning comes first in a turn: a leading <think> block (an unclosed one runs to the end). Tags later in the text
# are content (an extracted answer may quote one) and stay.
_LEADING_THINK = re.compile(r"\s*<think>.*?(?:</think>\s*|$)", re.DOTALL)


def chat_template_kwargs(tokenizer, overrides: dict | None = None) -> dict:
    """The settings passed to the chat template on every render. A template with a thinking switch (Qwen3) gets
    thinking off unless `overrides` say otherwise: extractions and answers are short, and reasoning text would
    otherwise be scored as the answer and learned as one."""
    template = tokenizer.chat_template or ""
    text = template if isinstance(template, str) else " ".join(template.values())
    settings = {THINKING_SWITCH: False} if THINKING_SWITCH in text else {}
    settings.update(overrides or {})
    return settings


def chat_text(tokenizer, messages: list[dict[str, str]], template_kwargs: dict, generation_prompt: bool) -> str:
    """`messages` rendered by the chat template with these settings."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                         **template_kwargs)


def chat_ids(tokenizer, messages: list[dict[str, str]], template_kwargs: dict, generation_prompt: bool,
             suffix: str = "") -> list[int]:
    """Token ids of `messages` rendered by the chat template, plus `suffix` (e.g. a prefill) after them."""
    text = chat_text(tokenizer, messages, template_kwargs, generation_prompt)
    return tokenizer(text + suffix, add_special_tokens=False)["input_ids"]


def strip_thinking(text: str) -> str:
    """The text after a reasoning model's leading `<think>...</think>` block: its answer or extraction."""
    match = _LEADING_THINK.match(text)
    return text[match.end() :] if match else text


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and each EOS of the model's generation config (Qwen3 lists
    two)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id rows padded on the left, so that every row's continuation starts
    at the same column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
    return input_ids, attention_mask
