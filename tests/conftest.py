"""Session fixtures: the packaged SmolLM2-135M-Instruct model, its PyTorch reference, tiny models.

The packaged GGUF is read once for the Flax model (`load_model`) and once for the reference,
so the reference gets the dequantised weights through `read_gguf` alone and does not share the
Flax model's conversion path.
"""

from __future__ import annotations

import pytest

import tiny_models
from ea_jax import loading


@pytest.fixture(scope="session")
def packaged_gguf_path():
    try:
        return loading.find_default_gguf()
    except loading.ModelLoadError as error:
        pytest.skip(f"packaged model unavailable: {error}")


@pytest.fixture(scope="session")
def packaged_model(packaged_gguf_path) -> loading.LoadedModel:
    """The default model on a single-device mesh."""
    return loading.load_model(str(packaged_gguf_path), mesh=tiny_models.single_device_mesh())


@pytest.fixture(scope="session")
def packaged_reference(packaged_gguf_path):
    """transformers' LlamaForCausalLM holding the same dequantised GGUF weights (sdpa attention)."""
    from torch_reference import build_torch_llama

    config, hf_state, _ = loading.read_gguf(packaged_gguf_path)
    return build_torch_llama(config, hf_state, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def packaged_tokenizer(packaged_model):
    return packaged_model.tokenizer


@pytest.fixture(scope="session")
def char_tokenizer():
    return tiny_models.char_tokenizer()
