"""Pre-flight plan: per-device shapes, divisibility problems and memory, checked by hand."""

import math

import pytest

from ea_jax import plan, sharding
from ea_jax.model import ModelConfig

CONFIG = ModelConfig(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
)


def make(mesh_sizes, **overrides):
    options = dict(sft_batch_size=8, sft_length=16, generation_batch_size=8, cache_length=32)
    options.update(overrides)
    return plan.make_plan(CONFIG, mesh_sizes, **options)


def test_plan_per_device_shapes():
    result = make({"data": 1, "fsdp": 4, "tensor": 2})
    rows = {row.name: row for row in result.params}

    assert rows["embed_tokens"].per_device_shape == (48, 8)  # vocab over tensor, embed over fsdp
    assert rows["layers.0.self_attn.q_proj"].per_device_shape == (8, 2, 8)
    assert rows["layers.0.mlp.down_proj"].per_device_shape == (24, 8)
    assert rows["norm.weight"].per_device_shape == (32,)
    assert result.problems == ()


def test_plan_parameter_bytes_match_count():
    result = make({"data": 1, "fsdp": 1, "tensor": 1})

    assert result.memory_bytes["parameters"] == CONFIG.num_parameters() * 4
    assert result.memory_bytes["adamw_state"] == 2 * CONFIG.num_parameters() * 4


def test_plan_kv_cache_bytes():
    result = make({"data": 2, "fsdp": 1, "tensor": 2})

    # 2 (keys, values) x layers x local batch 4 x 32 slots x 1 local kv head x head_dim 8 x 4 bytes
    assert result.memory_bytes["kv_cache"] == 2 * 2 * 4 * 32 * 1 * 8 * 4


def test_plan_flags_batch_not_divisible():
    result = make({"data": 2, "fsdp": 2, "tensor": 1}, sft_batch_size=6)

    assert any("sft.batch_size=6" in problem and "multiple of 4" in problem for problem in result.problems)


def test_plan_flags_heads_not_divisible():
    result = make({"data": 1, "fsdp": 1, "tensor": 8})

    assert any("num_attention_heads=4" in problem for problem in result.problems)
    assert any("layers.*.self_attn.q_proj" in problem for problem in result.problems)
    assert not any("layers.0." in problem for problem in result.problems)  # one message for all layers


def test_check_plan_raises_with_every_problem():
    result = make({"data": 1, "fsdp": 1, "tensor": 8}, generation_batch_size=8)

    with pytest.raises(sharding.ShardingError) as error:
        plan.check_plan(result)
    assert str(error.value).count("\n  - ") == len(result.problems)


def test_plan_every_parameter_listed():
    result = make({"data": 1, "fsdp": 1, "tensor": 1})

    total = sum(math.prod(row.shape) for row in result.params)
    assert total == CONFIG.num_parameters()
