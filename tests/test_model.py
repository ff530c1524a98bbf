"""Parity of the Flax Llama decoder with transformers' PyTorch Llama on tiny random models.

Every parameter is random (norm weights and biases included) and the sizes are distinct, so a
swapped axis fails on shape and a dropped term changes the logits.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import tiny_models
from ea_jax import loading
from ea_jax.model import (
    KVCache,
    ModelConfig,
    ModelConfigError,
    RMSNorm,
    abstract_model,
    causal_mask,
    forward,
    init_model,
    positions_from_mask,
    rotary_embedding,
)
from torch_reference import build_torch_llama, left_padding_positions, torch_logits

# float32 on both sides. The same maths summed in a different order differed by up to 2e-5 on
# these tiny models (tied variants have logits up to about 30), so 1e-4 leaves margin while a
# wrong layout or a dropped term moves logits by more than 1e-2.
FP32_ATOL = 1e-4

VARIANTS = {
    "tied_gqa": dict(tie_word_embeddings=True, num_key_value_heads=2),
    "untied_biases": dict(tie_word_embeddings=False, num_key_value_heads=3, attention_bias=True, mlp_bias=True),
    "tied_mha_attention_bias": dict(tie_word_embeddings=True, num_key_value_heads=6, attention_bias=True),
    "untied_mlp_bias": dict(tie_word_embeddings=False, num_key_value_heads=2, mlp_bias=True),
}

LENGTHS = [11, 7, 4, 1]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request):
    """(config, graphdef, params, torch model) for one variant, sharing the same random weights."""
    config = tiny_models.tiny_config(**VARIANTS[request.param])
    graphdef, params = tiny_models.random_params(config, seed=3)
    reference = build_torch_llama(config, loading.params_to_hf_state(config, params))
    return config, graphdef, params, reference


def real_positions_max_diff(ours: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    real = mask.astype(bool)
    return float(np.abs(ours[real] - reference[real]).max())


# ---------------------------------------------------------------------------------------------
# Whole model against transformers.


def test_logits_match_torch_right_padded(pair):
    config, graphdef, params, reference = pair
    tokens, mask = tiny_models.right_padded(tiny_models.random_prompts(LENGTHS, config.vocab_size, seed=1))

    ours = np.asarray(forward(graphdef, params, *tiny_models.as_jax(tokens, mask)))
    expected = torch_logits(reference, tokens, mask)

    assert ours.shape == (len(LENGTHS), max(LENGTHS), config.vocab_size)
    assert real_positions_max_diff(ours, expected, mask) <= FP32_ATOL


def test_logits_match_torch_left_padded(pair):
    config, graphdef, params, reference = pair
    tokens, mask = tiny_models.left_padded(tiny_models.random_prompts(LENGTHS, config.vocab_size, seed=2))

    ours = np.asarray(forward(graphdef, params, *tiny_models.as_jax(tokens, mask)))
    expected = torch_logits(reference, tokens, mask, position_ids=left_padding_positions(mask))

    assert real_positions_max_diff(ours, expected, mask) <= FP32_ATOL


def test_left_padding_leaves_logits_unchanged(pair):
    config, graphdef, params, _ = pair
    prompts = tiny_models.random_prompts(LENGTHS, config.vocab_size, seed=4)
    # One batch holds every prompt twice: left-aligned (no padding before it) and right-aligned
    # (left-padded). Causal attention keeps trailing padding from affecting earlier tokens.
    right_tokens, right_mask = tiny_models.right_padded(prompts)
    left_tokens, left_mask = tiny_models.left_padded(prompts)
    tokens = np.concatenate([right_tokens, left_tokens])
    mask = np.concatenate([right_mask, left_mask])
    logits = np.asarray(forward(graphdef, params, *tiny_models.as_jax(tokens, mask)))

    for row, prompt in enumerate(prompts):
        unpadded = logits[row, : len(prompt)]
        padded = logits[len(prompts) + row, -len(prompt) :]
        assert np.abs(padded - unpadded).max() <= FP32_ATOL, f"prompt {row}"


def test_decoder_layer_matches_torch(pair):
    config, graphdef, params, reference = pair
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(5)
    hidden = rng.normal(size=(2, 9, config.hidden_size)).astype(np.float32)
    positions = np.broadcast_to(np.arange(9), (2, 9))

    mask = np.ones((2, 9), np.int32)
    ours, _ = model.layers[1](
        jnp.asarray(hidden), jnp.asarray(positions), causal_mask(jnp.asarray(mask)), None, None
    )

    # Eager attention adds the mask to the scores: 0 where visible, the float32 minimum elsewhere.
    visible = np.tril(np.ones((9, 9), bool))
    additive = np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None]
    with torch.no_grad():
        hidden_torch = torch.tensor(hidden)
        position_ids = torch.tensor(positions.copy(), dtype=torch.long)
        position_embeddings = reference.model.rotary_emb(hidden_torch, position_ids)
        expected = reference.model.layers[1](
            hidden_torch,
            attention_mask=torch.tensor(additive).expand(2, 1, 9, 9),
            position_ids=position_ids,
            position_embeddings=position_embeddings,
        )
    assert np.abs(np.asarray(ours) - expected.numpy()).max() <= FP32_ATOL


# ---------------------------------------------------------------------------------------------
# Pieces against their formulas.


def test_rms_norm_matches_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 42)).astype(np.float32) * 3.0
    weight = rng.normal(size=(42,)).astype(np.float32)
    norm = RMSNorm(42, eps=1e-5)
    norm.weight[...] = jnp.asarray(weight)

    expected = weight * x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-5)

    assert np.abs(np.asarray(norm(jnp.asarray(x))) - expected).max() <= FP32_ATOL


def test_rms_norm_matches_torch():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 42)).astype(np.float32)
    weight = rng.normal(size=(42,)).astype(np.float32)
    norm = RMSNorm(42, eps=1e-6)
    norm.weight[...] = jnp.asarray(weight)
    reference = transformers.models.llama.modeling_llama.LlamaRMSNorm(42, eps=1e-6)
    reference.weight.data = torch.tensor(weight)

    with torch.no_grad():
        expected = reference(torch.tensor(x)).numpy()

    assert np.abs(np.asarray(norm(jnp.asarray(x))) - expected).max() <= FP32_ATOL


def rotate_as_complex(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotary embedding written from its definition, in float64.

    In the rotate-half layout, dimension j and j + H/2 form the complex number x_j + i x_{j+H/2},
    which is multiplied by exp(i * position * theta^(-2j/H)).
    """
    half = x.shape[-1] // 2
    pairs = x[..., :half].astype(np.float64) + 1j * x[..., half:].astype(np.float64)
    frequencies = theta ** (-2.0 * np.arange(half) / x.shape[-1])
    angles = positions[:, :, None, None] * frequencies  # [B, T, 1, H/2]
    rotated = pairs * np.exp(1j * angles)
    return np.concatenate([rotated.real, rotated.imag], axis=-1)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rotary_matches_complex_rotation(theta):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)  # [B, T, heads, H]
    positions = np.array([[0, 1, 2, 3, 4, 5], [0, 0, 0, 7, 8, 200]])

    ours = np.asarray(rotary_embedding(jnp.asarray(x), jnp.asarray(positions), theta))

    assert np.abs(ours - rotate_as_complex(x, positions, theta)).max() <= FP32_ATOL


def test_rotary_position_zero_is_identity():
    x = np.random.default_rng(3).normal(size=(1, 2, 2, 8)).astype(np.float32)
    ours = np.asarray(rotary_embedding(jnp.asarray(x), jnp.zeros((1, 2), jnp.int32), 10000.0))
    np.testing.assert_array_equal(ours, x)


def test_rotary_matches_torch():
    config = tiny_models.tiny_config()
    rng = np.random.default_rng(4)
    q = rng.normal(size=(2, 5, config.num_attention_heads, config.head_dim)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [3, 9, 27, 81, 243]])

    hf_config = transformers.LlamaConfig(**config.to_hf_config())
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    with torch.no_grad():
        q_torch = torch.tensor(q).transpose(1, 2)  # transformers rotates [B, N, T, H]
        cos, sin = rotary(q_torch, torch.tensor(positions))
        expected, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q_torch, q_torch, cos, sin)
    ours = np.asarray(rotary_embedding(jnp.asarray(q), jnp.asarray(positions), config.rope_theta))

    assert np.abs(ours - expected.transpose(1, 2).numpy()).max() <= FP32_ATOL


def test_positions_from_mask_counts_real_tokens():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 1, 0, 1, 1]])
    expected = [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3], [0, 0, 0, 1, 2]]
    assert np.asarray(positions_from_mask(mask)).tolist() == expected


def test_causal_mask_left_padded_row():
    mask = np.asarray(causal_mask(jnp.asarray([[0, 1, 1]])))
    expected = [[[False, False, False], [False, True, False], [False, True, True]]]
    assert mask.tolist() == expected


# ---------------------------------------------------------------------------------------------
# KV cache.


@functools.partial(jax.jit, static_argnames="graphdef")
def call_with_cache(graphdef, params, tokens, positions, attention_mask, cache, cache_index):
    """One model call that reads and writes the cache (jitted: eager dispatch is slow)."""
    return nnx.merge(graphdef, params)(tokens, positions, attention_mask, cache, cache_index)


def test_kv_cache_decode_matches_forward():
    config = tiny_models.tiny_config(num_key_value_heads=3)
    graphdef, params = tiny_models.random_params(config, seed=6)
    prompts = tiny_models.random_prompts([9, 5, 2], config.vocab_size, seed=7)
    continuation = tiny_models.random_prompts([6, 6, 6], config.vocab_size, seed=8)
    prompt_tokens, prompt_mask = tiny_models.left_padded(prompts)
    full_tokens = np.concatenate([prompt_tokens, np.asarray(continuation, np.int32)], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones((3, 6), np.int32)], axis=1)
    expected = np.asarray(forward(graphdef, params, *tiny_models.as_jax(full_tokens, full_mask)))

    # Prefill: the prompt fills slots [0, T) of a cache with room for the continuation.
    length = prompt_tokens.shape[1]
    cache = KVCache.init(config, batch_size=3, max_length=length + 6)
    cache = cache.replace(mask=cache.mask.at[:, :length].set(jnp.asarray(prompt_mask, bool)))
    visible = jnp.arange(length + 6)[None, :] <= jnp.arange(length)[:, None]
    prefill_logits, cache = call_with_cache(
        graphdef,
        params,
        jnp.asarray(prompt_tokens),
        positions_from_mask(jnp.asarray(prompt_mask)),
        visible[None] & cache.mask[:, None, :],
        cache,
        jnp.int32(0),
    )
    real = prompt_mask.astype(bool)
    assert np.abs(np.asarray(prefill_logits)[real] - expected[:, :length][real]).max() <= FP32_ATOL

    # Decode one token at a time, each written at the next shared slot.
    last_positions = np.asarray(positions_from_mask(jnp.asarray(prompt_mask)))[:, -1]
    for step in range(6):
        slot = length + step
        cache = cache.replace(mask=cache.mask.at[:, slot].set(True))
        step_logits, cache = call_with_cache(
            graphdef,
            params,
            jnp.asarray(full_tokens[:, slot : slot + 1]),
            jnp.asarray(last_positions[:, None] + step + 1),
            cache.mask[:, None, :],
            cache,
            jnp.int32(slot),
        )
        assert np.abs(np.asarray(step_logits)[:, 0] - expected[:, slot]).max() <= FP32_ATOL, f"step {step}"


# ---------------------------------------------------------------------------------------------
# Configuration.


def test_config_round_trip_through_transformers():
    config = tiny_models.tiny_config(tie_word_embeddings=True, attention_bias=True, eos_token_id=(1, 5))
    # transformers 5 writes rope_theta inside rope_parameters; the parser must find it there.
    written = transformers.LlamaConfig(**config.to_hf_config()).to_dict()
    assert ModelConfig.from_hf_config(written) == config


def test_config_reads_legacy_rope_theta():
    fields = dict(tiny_models.tiny_config().to_hf_config(), rope_theta=123.0)
    assert ModelConfig.from_hf_config(fields).rope_theta == 123.0


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("model_type", "mistral", "'mistral'"),
        ("hidden_act", "gelu", "'gelu'"),
        ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "llama3"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}, "linear"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "yarn"),
    ],
)
def test_config_rejects_unsupported(field, value, named):
    fields = dict(tiny_models.tiny_config().to_hf_config(), **{field: value})
    with pytest.raises(ModelConfigError, match=named):
        ModelConfig.from_hf_config(fields)


def test_config_rejects_heads_not_multiple_of_kv_heads():
    with pytest.raises(ModelConfigError, match="num_key_value_heads=4"):
        tiny_models.tiny_config(num_key_value_heads=4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_num_parameters_counts_every_weight(variant):
    config = tiny_models.tiny_config(**VARIANTS[variant])
    leaves = jax.tree_util.tree_leaves(nnx.state(abstract_model(config), nnx.Param))
    reference = build_torch_llama(config, tiny_models.hf_state(config))

    assert config.num_parameters() == sum(int(np.prod(leaf.shape)) for leaf in leaves)
    assert config.num_parameters() == sum(p.numel() for p in reference.parameters())


def test_init_model_is_seeded():
    config = tiny_models.tiny_config()
    first = nnx.state(init_model(config, seed=0), nnx.Param)
    again = nnx.state(init_model(config, seed=0), nnx.Param)
    other = nnx.state(init_model(config, seed=1), nnx.Param)
    np.testing.assert_array_equal(np.asarray(first["embed_tokens"][...]), np.asarray(again["embed_tokens"][...]))
    assert not np.array_equal(np.asarray(first["embed_tokens"][...]), np.asarray(other["embed_tokens"][...]))


def test_params_to_hf_state_shapes_match_torch():
    config = tiny_models.tiny_config(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    hf_config = transformers.LlamaConfig(**config.to_hf_config())
    expected = {name: tuple(p.shape) for name, p in transformers.LlamaForCausalLM(hf_config).state_dict().items()}
    ours = {name: tuple(value.shape) for name, value in tiny_models.hf_state(config).items()}
    assert ours == expected


def test_tied_config_has_no_lm_head():
    config = tiny_models.tiny_config(tie_word_embeddings=True)
    assert "lm_head.weight" not in tiny_models.hf_state(config)


def test_config_is_frozen():
    config = tiny_models.tiny_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.vocab_size = 5  # type: ignore[misc]


def test_query_chunked_attention_matches_full():
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ea_jax.model import causal_mask, init_model, positions_from_mask

    config = ModelConfig(
        vocab_size=103, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8,
    )
    model = init_model(config, seed=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 103, (2, 11)), jnp.int32)
    input_mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 11], jnp.int32)
    positions, mask = positions_from_mask(input_mask), causal_mask(input_mask)

    full, _ = model(tokens, positions, mask)
    chunked, _ = model(tokens, positions, mask, query_chunk=4)  # chunks of 4, 4 and 3 queries

    real = np.asarray(input_mask, bool)
    assert np.abs(np.asarray(full)[real] - np.asarray(chunked)[real]).max() < 1e-5
