"""transformers' PyTorch Llama as the reference implementation for the parity tests.

torch is a test-only dependency: nothing in `ea_jax` imports it.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from ea_jax.model import ModelConfig

# torch's OpenMP workers busy-wait. On a 2-core machine whose cores other processes also used,
# a batch-4 decode step of SmolLM2-135M took 1.5-4 s with 2 threads and 0.15 s with 1 (torch
# 2.13 CPU), so the reference runs on one thread.
torch.set_num_threads(1)


def build_torch_llama(config: ModelConfig, hf_state: dict[str, np.ndarray], attn_implementation: str = "eager"):
    """LlamaForCausalLM in eval mode, float32, holding `hf_state`.

    "eager" attention is the plain softmax(QK^T / sqrt(H) + mask) V, the most literal reference.
    Raises AssertionError when the state dict does not cover the model, so a test never compares
    against randomly initialised torch weights.
    """
    hf_config = transformers.LlamaConfig(**config.to_hf_config(), attn_implementation=attn_implementation)
    model = transformers.LlamaForCausalLM(hf_config).eval()

    tensors = {name: torch.tensor(np.asarray(value, np.float32)) for name, value in hf_state.items()}
    result = model.load_state_dict(tensors, strict=False)
    expected_missing = ["lm_head.weight"] if config.tie_word_embeddings else []
    assert list(result.missing_keys) == expected_missing, f"tensors missing from the state dict: {result.missing_keys}"
    assert list(result.unexpected_keys) == [], f"tensors torch does not know: {result.unexpected_keys}"

    if config.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head is not tied"
    return model


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray, position_ids: np.ndarray | None = None) -> np.ndarray:
    """Float32 logits [B, T, V]. Without `position_ids`, transformers numbers the columns from 0."""
    kwargs = {}
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        output = model(
            input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
            **kwargs,
        )
    return output.logits.float().numpy()


def left_padding_positions(mask: np.ndarray) -> np.ndarray:
    """Positions that count real tokens only, clamped to 0 on the padding (our convention)."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
