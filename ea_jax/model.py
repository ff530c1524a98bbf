"""Flax NNX decoder for the Llama family (Llama 1/2, SmolLM, TinyLlama and compatible models).

RMSNorm, rotary position embeddings (the non-interleaved "rotate half" layout that Hugging Face
transformers uses), grouped-query attention, SwiGLU MLP, tied or untied embeddings. Every
parameter carries logical axis names (see `ea_jax.sharding`) so one model runs on one CPU or on
a mesh.

Padding convention: prompts are left-padded. `input_mask` marks real tokens; positions count
real tokens only, so a row's first real token has position 0 whatever its padding.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from ea_jax.sharding import constrain

logger = logging.getLogger(__name__)

# Query chunk for long causal passes that start at slot 0 (prefill and full-sequence forward).
QUERY_CHUNK = 256

# Hugging Face `model_type` values whose checkpoints this decoder reproduces exactly.
SUPPORTED_MODEL_TYPES = ("llama",)


class ModelConfigError(ValueError):
    """A model configuration that this decoder cannot reproduce faithfully."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters, named after Hugging Face `config.json` fields."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs it to be"
            )

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build a config from a Hugging Face `config.json` dict, rejecting fields we would ignore."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act {hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU) is")
        rope_scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
            raise ModelConfigError(
                f"rope_scaling {rope_scaling!r} is not implemented; only unscaled rotary embeddings are"
            )
        rope_theta = hf.get("rope_theta")
        if rope_theta is None and rope_scaling:
            rope_theta = rope_scaling.get("rope_theta")
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """Return the Hugging Face `config.json` fields that describe this architecture."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        }

    def num_parameters(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        attention = d * h * (2 * n + 2 * k)
        if self.attention_bias:
            attention += (n + 2 * k) * h + d  # q, k, v and o biases
        mlp = 3 * d * f
        if self.mlp_bias:
            mlp += 2 * f + d  # gate, up and down biases
        layer = attention + mlp + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embeddings + d


@struct.dataclass
class KVCache:
    """Per-layer keys and values, each [B, K, S, H], written at one shared slot per step.

    The cache keeps one array per layer rather than one stacked [L, ...] array. XLA on CPU
    updates separate buffers in place, but it copied a whole stacked cache to update one slice,
    which made decoding SmolLM2-135M about 4x slower (measured on a 2-core CPU, jax 0.10.2).

    Rows are left-padded, so every row writes its next token at the same slot; `mask` [B, S]
    marks the slots that hold real tokens and is the only thing that differs per row.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array  # [B, S]

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_length: int, dtype=jnp.float32) -> KVCache:
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in layers),
            values=tuple(jnp.zeros(shape, dtype) for _ in layers),
            mask=jnp.zeros((batch_size, max_length), bool),
        )

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], scale: float) -> nnx.Param:
    value = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, sharding_names=names, eager_sharding=False)


def _ones_param(shape: tuple[int, ...], names: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, jnp.float32), sharding_names=names, eager_sharding=False)


def _zeros_param(shape: tuple[int, ...], names: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32), sharding_names=names, eager_sharding=False)


# ---------------------------------------------------------------------------------------------
# Pure helpers.


def positions_from_mask(input_mask: jax.Array) -> jax.Array:
    """Positions [B, T] that count real tokens only: left padding gets position 0."""
    return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(input_mask: jax.Array) -> jax.Array:
    """Attention mask [B, T, T]: query t sees key s when s <= t and s is a real token.

    Example for one row left-padded by one (input_mask = [0, 1, 1]):
        t=0: [0, 0, 0]   (a padding query sees nothing; its output is never used)
        t=1: [0, 1, 0]
        t=2: [0, 1, 1]
    """
    length = input_mask.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None] & input_mask[:, None, :].astype(bool)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate x [B, T, *, H] by positions [B, T] in the rotate-half layout of transformers' Llama."""
    head_dim = x.shape[-1]
    # inv_freq in float32 from integer exponents, as transformers computes it.
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles), jnp.sin(angles)

    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def grouped_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, K, S, H]
    v: jax.Array,  # [B, K, S, H]
    attention_mask: jax.Array,  # [B, T, S]
    config: ModelConfig,
) -> jax.Array:
    """Softmax attention without repeating K/V: query heads split into K groups of G. [B, T, N, H]"""
    dtype = q.dtype
    batch, length = q.shape[:2]
    kv_heads = config.num_key_value_heads
    groups = config.num_attention_heads // kv_heads
    q = q.reshape(batch, length, kv_heads, groups, config.head_dim)
    q = q.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, groups * length, config.head_dim)
    scores = jnp.einsum("bkqh,bksh->bkqs", q, k.astype(dtype)).astype(jnp.float32)  # q = (G, T) flattened
    scores = scores.reshape(batch, kv_heads, groups, length, -1) * config.head_dim**-0.5
    scores = jnp.where(attention_mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [B, K, G, T, S]

    probs = probs.reshape(batch, kv_heads, groups * length, -1)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v.astype(dtype))
    out = out.reshape(batch, kv_heads, groups, length, config.head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, config.num_attention_heads, config.head_dim)


# ---------------------------------------------------------------------------------------------
# Layers, bottom-up.


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = _ones_param((dim,), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32 and cast back before the weight, as transformers' LlamaRMSNorm does.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        scale = d**-0.5
        self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), scale)
        self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), scale)
        self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), scale)
        self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), (n * h) ** -0.5)
        if config.attention_bias:
            self.q_bias = _zeros_param((n, h), ("heads", "head_dim"))
            self.k_bias = _zeros_param((k, h), ("kv_heads", "head_dim"))
            self.v_bias = _zeros_param((k, h), ("kv_heads", "head_dim"))
            self.o_bias = _zeros_param((d,), ("embed",))
        self.config = config

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T]
        attention_mask: jax.Array,  # [B, T, S]
        cache: tuple[jax.Array, jax.Array] | None,  # ([B, K, S, H], [B, K, S, H]) for this layer
        cache_index: jax.Array | None,  # slot where this call's first token is written
        query_chunk: int = 0,  # > 0 only when queries start at slot 0 (prefill, full forward)
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        config = self.config
        dtype = x.dtype
        batch, length = x.shape[:2]
        n, k_heads, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        # Projections as 2-D matmuls on free reshapes of the [D, N, H] kernels: written as 3-D
        # einsums, XLA on CPU transposed a kernel copy inside every decode step.
        q = (x @ self.q_proj[...].astype(dtype).reshape(-1, n * h)).reshape(batch, length, n, h)
        k = (x @ self.k_proj[...].astype(dtype).reshape(-1, k_heads * h)).reshape(batch, length, k_heads, h)
        v = (x @ self.v_proj[...].astype(dtype).reshape(-1, k_heads * h)).reshape(batch, length, k_heads, h)
        if config.attention_bias:
            q = q + self.q_bias[...].astype(dtype)
            k = k + self.k_bias[...].astype(dtype)
            v = v + self.v_bias[...].astype(dtype)
        q = constrain(q, ("batch", "length", "act_heads", None))

        q = rotary_embedding(q, positions, config.rope_theta)
        k = rotary_embedding(k, positions, config.rope_theta)

        # Keys and values as [B, K, S, H]: the layout the batched matmuls below read without a transpose.
        k = k.transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        if cache is not None:
            cached_k, cached_v = cache
            k = jax.lax.dynamic_update_slice_in_dim(cached_k, k.astype(cached_k.dtype), cache_index, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cached_v, v.astype(cached_v.dtype), cache_index, axis=2)
            cache = (k, v)

        if query_chunk and length > query_chunk:
            # Queries start at slot 0 and are causal, so the chunk ending at query `end` attends
            # to the first `end` keys only. Skipping the rest halves the work of a long prefill.
            chunks = []
            for start in range(0, length, query_chunk):
                end = min(start + query_chunk, length)
                chunks.append(grouped_attention(
                    q[:, start:end], k[:, :, :end], v[:, :, :end], attention_mask[:, start:end, :end], config
                ))
            out = jnp.concatenate(chunks, axis=1)
        else:
            out = grouped_attention(q, k, v, attention_mask, config)
        out = out.reshape(batch, length, n * h) @ self.o_proj[...].astype(dtype).reshape(n * h, -1)
        if config.attention_bias:
            out = out + self.o_bias[...].astype(dtype)
        return out, cache


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), d**-0.5)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), d**-0.5)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), f**-0.5)
        if config.mlp_bias:
            self.gate_bias = _zeros_param((f,), ("mlp",))
            self.up_bias = _zeros_param((f,), ("mlp",))
            self.down_bias = _zeros_param((d,), ("embed",))
        self.config = config

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        gate = x @ self.gate_proj[...].astype(dtype)
        up = x @ self.up_proj[...].astype(dtype)
        if self.config.mlp_bias:
            gate = gate + self.gate_bias[...].astype(dtype)
            up = up + self.up_bias[...].astype(dtype)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))  # [B, T, F]
        out = hidden @ self.down_proj[...].astype(dtype)
        if self.config.mlp_bias:
            out = out + self.down_bias[...].astype(dtype)
        return out


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, positions, attention_mask, cache, cache_index, query_chunk=0):
        attn_out, cache = self.self_attn(
            self.input_layernorm(x), positions, attention_mask, cache, cache_index, query_chunk
        )
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed")), cache


class Llama(nnx.Module):
    """Decoder-only transformer returning float32 logits [B, T, V]."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), 1.0)
        self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = _param(
                rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), config.hidden_size**-0.5
            )

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array,  # [B, T] int32
        attention_mask: jax.Array,  # [B, T, S] bool
        kv_cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        dtype=jnp.float32,
        query_chunk: int = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits [B, T, V] and the updated cache.

        `query_chunk` > 0 computes causal attention in query chunks of that size, skipping keys
        no query of a chunk can see; it is only valid when this call's queries start at slot 0.
        """
        # Gather from a table that is not split over vocab, so XLA need not rebuild it on every device.
        table = constrain(self.embed_tokens[...], (None, "embed"))
        x = jnp.take(table, tokens, axis=0).astype(dtype)  # [B, T, D]
        x = constrain(x, ("batch", "length", "act_embed"))

        new_keys, new_values = [], []
        for index, layer in enumerate(self.layers):
            layer_cache = None if kv_cache is None else (kv_cache.keys[index], kv_cache.values[index])
            x, layer_cache = layer(x, positions, attention_mask, layer_cache, cache_index, query_chunk)
            if layer_cache is not None:
                new_keys.append(layer_cache[0])
                new_values.append(layer_cache[1])

        x = self.norm(x)
        if self.config.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, self.embed_tokens[...].astype(dtype))
        else:
            logits = x @ self.lm_head[...].astype(dtype)
        logits = constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))

        if kv_cache is not None:
            kv_cache = kv_cache.replace(keys=tuple(new_keys), values=tuple(new_values))
        return logits, kv_cache


# ---------------------------------------------------------------------------------------------
# Jitted entry points. The graph definition is static; parameters are a pytree argument, so the
# same compiled function serves the source model and every finetuned model of the same shape.


@functools.partial(jax.jit, static_argnames=("graphdef", "dtype"))
def forward(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, input_mask: jax.Array, dtype=jnp.float32):
    """Full-sequence logits [B, T, V] for left- or right-padded tokens, without a cache."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(
        tokens, positions_from_mask(input_mask), causal_mask(input_mask), dtype=dtype, query_chunk=QUERY_CHUNK
    )
    return logits


def init_model(config: ModelConfig, seed: int = 0) -> Llama:
    """Random-weight model (for tests and from-scratch runs)."""
    return Llama(config, nnx.Rngs(params=seed))


def abstract_model(config: ModelConfig) -> Llama:
    """Build the model with ShapeDtypeStruct leaves: shapes and axis names, no memory allocated."""
    return nnx.eval_shape(lambda: Llama(config, nnx.Rngs(params=0)))
