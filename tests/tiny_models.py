"""Tiny random Llama models and a character tokenizer, shared by the tests and `mesh_worker.py`.

Sizes are small and distinct so that a swapped axis fails on shape: vocab 103, width 42,
MLP 56, 6 query heads of head_dim 8 (6 * 8 = 48, not the width 42). transformers requires the
width to be a multiple of the number of heads, which is why the width is 42 and not odd.

This module imports JAX but never torch, so the mesh worker can use it without torch.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ea_jax import loading, sharding
from ea_jax.model import ModelConfig, init_model

# Three special tokens plus the 100 characters of `string.printable`: exactly 103 ids.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(string.printable)

TINY_FIELDS = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=42,
    intermediate_size=56,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    rope_theta=500.0,  # not the 10000 default, so a hard-coded theta fails the parity tests
    max_position_embeddings=256,
    eos_token_id=EOS_ID,
)

# Mesh-friendly variant: width 36 divides over fsdp 4, vocab 106 and MLP 56 over tensor 2.
MESH_FIELDS = dict(TINY_FIELDS, hidden_size=36, vocab_size=106)


def tiny_config(**overrides) -> ModelConfig:
    """The tiny configuration with some fields replaced."""
    return ModelConfig(**{**TINY_FIELDS, **overrides})


def random_params(config: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and parameters with every leaf perturbed by 0.1 * N(0, 1).

    `init_model` sets norm weights to one and biases to zero, so a dropped norm weight or bias
    would not change the output. The perturbation makes every parameter matter.
    """
    graphdef, state = nnx.split(init_model(config, seed=seed), nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    perturbed = [leaf + 0.1 * jax.random.normal(key, leaf.shape, leaf.dtype) for leaf, key in zip(leaves, keys)]
    return graphdef, jax.tree_util.tree_unflatten(treedef, perturbed)


def hf_state(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random parameters in Hugging Face names and layouts."""
    _, state = random_params(config, seed)
    return loading.params_to_hf_state(config, state)


def char_tokenizer():
    """A fast tokenizer with one id per printable character, ids 0-2 special (pad, eos, unk)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[UNK_ID]))
    # Split into single characters and join them back without spaces.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=SPECIAL_TOKENS[PAD_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        unk_token=SPECIAL_TOKENS[UNK_ID],
    )


def single_device_mesh() -> Mesh:
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def tiny_loaded_model(config: ModelConfig, seed: int = 0, mesh: Mesh | None = None, tokenizer=None):
    """A `LoadedModel` of random weights, placed through the same path as real checkpoints."""
    mesh = mesh if mesh is not None else single_device_mesh()
    params = loading.convert_hf_state(hf_state(config, seed), config)
    graphdef, state = loading.place_params(config, params, mesh)
    return loading.LoadedModel(
        config=config,
        graphdef=graphdef,
        params=state,
        tokenizer=tokenizer if tokenizer is not None else char_tokenizer(),
        model_id=f"tiny-random-{seed}",
        source="tests",
        mesh=mesh,
        eos_token_ids=(EOS_ID,),
    )


def left_padded(prompts: list[list[int]], pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and mask [B, T], each prompt aligned to the right end."""
    length = max(len(prompt) for prompt in prompts)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = 1
    return tokens, mask


def right_padded(prompts: list[list[int]], pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and mask [B, T], each prompt aligned to the left end."""
    length = max(len(prompt) for prompt in prompts)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    return tokens, mask


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Prompts of the given lengths drawn from the non-special ids."""
    rng = np.random.default_rng(seed)
    return [rng.integers(len(SPECIAL_TOKENS), vocab_size, size=length).tolist() for length in lengths]


def as_jax(*arrays: np.ndarray) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(array) for array in arrays)
