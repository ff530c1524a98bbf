"""Chat prompts and assistant-token masks, both taken from the tokenizer's own chat template.

Generation, SFT and evaluation all go through these functions, so the model is trained and
evaluated on exactly the text its template produces.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

Message = dict[str, str]


class ChatTemplateError(ValueError):
    """A conversation the chat template cannot render as expected."""


def user_turn(text: str, system: str | None = None) -> list[Message]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    return messages + [{"role": "user", "content": text}]


def _ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(token) for token in encoded]


def encode_chat(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template."""
    return _ids(tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt))


def encode_with_assistant_mask(
    tokenizer, messages: Sequence[Message], eos_token_ids: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation ending in an assistant turn, and a 0/1 mask of that turn.

    The mask covers the tokens the template adds after the generation prompt, up to and
    including the first end-of-sequence token (so the model learns to stop), and nothing after
    it. It is derived by rendering the conversation twice, once without the last turn and
    with the generation prompt; the first rendering must be a prefix of the second.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ChatTemplateError("the last message must be the assistant turn to train on")
    prompt_ids = encode_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    full_ids = encode_chat(tokenizer, messages, add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ChatTemplateError(
            "the chat template renders the prompt differently with and without the assistant turn, "
            "so assistant tokens cannot be located; use a template whose generation prompt is a prefix"
        )

    completion = full_ids[len(prompt_ids) :]
    end = next((i for i, token in enumerate(completion) if token in set(eos_token_ids)), None)
    if end is None:
        raise ChatTemplateError(
            f"the rendered assistant turn contains no end-of-sequence token {list(eos_token_ids)}; "
            "the model would never learn to stop"
        )
    ids = prompt_ids + completion[: end + 1]
    mask = [0] * len(prompt_ids) + [1] * (end + 1)
    return ids, mask


def format_mask_audit(tokenizer, ids: Sequence[int], mask: Sequence[int], max_tokens: int = 400) -> str:
    """One line per token, `[T]` for trained tokens, to log what the loss sees."""
    lines = []
    for token, flag in list(zip(ids, mask))[:max_tokens]:
        lines.append(f"{'[T]' if flag else '   '} {token:>6} {tokenizer.decode([token])!r}")
    if len(ids) > max_tokens:
        lines.append(f"... {len(ids) - max_tokens} more tokens")
    return "\n".join(lines)
