"""Mesh rules in this process, and sharded forward and generation on 8 host devices in a subprocess.

XLA creates host devices only when JAX initialises, and by the time this module runs pytest has
initialised JAX with one CPU device. The 8-device checks therefore run `mesh_worker.py` in a
fresh interpreter with XLA_FLAGS=--xla_force_host_platform_device_count=8 and assert on the JSON
it prints.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

import tiny_models
from ea_jax import loading, sharding
from ea_jax.model import abstract_model

WORKER = Path(__file__).with_name("mesh_worker.py")
WORKER_TIMEOUT_S = 600

# float32 on both sides; sharding over fsdp splits the width into partial sums that are
# all-reduced, a different summation order that moved logits of order 1-10 by about 4e-6.
SHARDED_FP32_ATOL = 1e-5


@pytest.fixture(scope="module")
def mesh_results() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    completed = subprocess.run(
        [sys.executable, str(WORKER)],
        cwd=WORKER.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    if completed.returncode != 0:
        pytest.fail(f"mesh_worker.py exited with {completed.returncode}:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout)


# ---------------------------------------------------------------------------------------------
# 8 host devices (subprocess).


@pytest.mark.parametrize("shape", ["2x2x2", "1x4x2"])
def test_sharded_forward_matches_single_device(mesh_results, shape):
    assert mesh_results["forward"][shape]["max_abs_diff"] <= SHARDED_FP32_ATOL


@pytest.mark.parametrize(
    "shape, fsdp, tensor",
    [("2x2x2", 2, 2), ("1x4x2", 4, 2)],
)
def test_parameters_are_split_over_mesh(mesh_results, shape, fsdp, tensor):
    # Mesh config: vocab 106, width 36, 6 heads of 8, MLP 56; embed on fsdp, vocab/heads/mlp on tensor.
    shard_shapes = mesh_results["forward"][shape]["shard_shapes"]
    assert shard_shapes["embed_tokens"] == [106 // tensor, 36 // fsdp]
    assert shard_shapes["layers.0.self_attn.q_proj"] == [36 // fsdp, 6 // tensor, 8]
    assert shard_shapes["layers.0.mlp.gate_proj"] == [36 // fsdp, 56 // tensor]
    assert shard_shapes["lm_head"] == [36 // fsdp, 106 // tensor]


def test_sharded_greedy_matches_single_device(mesh_results):
    generation = mesh_results["generation"]
    assert generation["mesh"]["greedy"] == generation["single"]["greedy"]
    assert all(len(tokens) > 0 for tokens in generation["single"]["greedy"])


def test_sharded_sampling_matches_single_device(mesh_results):
    generation = mesh_results["generation"]
    assert generation["mesh"]["sampled"] == generation["single"]["sampled"]


def test_generator_rejects_batch_not_multiple_of_mesh(mesh_results):
    message = mesh_results["rejections"]["batch_not_multiple"]
    assert message is not None
    assert message.startswith("GenerationConfigError: batch_size=6")
    assert "multiple of 4" in message


def test_place_params_rejects_indivisible_width(mesh_results):
    message = mesh_results["rejections"]["width_not_divisible"]
    assert message is not None
    assert message.startswith("ShardingError: parameter ")
    assert "size 36" in message
    assert "fsdp" in message


# ---------------------------------------------------------------------------------------------
# Mesh shapes and rules (this process).


@pytest.mark.parametrize(
    "shape, num_devices, expected",
    [
        ((1, -1, 1), 8, (1, 8, 1)),
        ((2, -1, 2), 8, (2, 2, 2)),
        ((-1, 4, 2), 8, (1, 4, 2)),
        ((1, 4, 2), 8, (1, 4, 2)),
        ((1, -1, 1), 1, (1, 1, 1)),
    ],
)
def test_resolve_mesh_shape(shape, num_devices, expected):
    assert sharding.resolve_mesh_shape(shape, num_devices) == expected


@pytest.mark.parametrize(
    "shape, num_devices, named",
    [
        ((1, 8), 8, r"\(1, 8\) has 2 entries"),
        ((1, -1, -1), 8, r"\(1, -1, -1\) has more than one -1"),
        ((0, 8, 1), 8, r"\(0, 8, 1\) has an invalid size"),
        ((1, -2, 4), 8, r"\(1, -2, 4\) has an invalid size"),
        ((1, 3, -1), 8, r"\(1, 3, -1\) cannot fill 8 devices"),
        ((1, 2, 2), 8, r"\(1, 2, 2\) uses 4 devices but 8 are available"),
    ],
)
def test_resolve_mesh_shape_rejects_invalid(shape, num_devices, named):
    with pytest.raises(sharding.ShardingError, match=named):
        sharding.resolve_mesh_shape(shape, num_devices)


def test_check_divisible_names_axis():
    mesh = AbstractMesh((1, 4, 2), sharding.MESH_AXES)
    with pytest.raises(sharding.ShardingError, match=r"dimension 1 of size 7 is sharded over mesh axes \('tensor',\)"):
        sharding.check_divisible((36, 7), PartitionSpec("fsdp", "tensor"), mesh, what="parameter w")


def test_check_divisible_names_parameter():
    mesh = AbstractMesh((1, 4, 2), sharding.MESH_AXES)
    with pytest.raises(sharding.ShardingError, match="parameter layers.0.w"):
        sharding.check_divisible((6, 8), PartitionSpec("fsdp"), mesh, what="parameter layers.0.w")


def test_check_divisible_accepts_even_split():
    mesh = AbstractMesh((2, 4, 2), sharding.MESH_AXES)
    sharding.check_divisible((8, 36, 6), PartitionSpec(("data", "fsdp"), None, "tensor"), mesh, what="x")


def test_check_divisible_multiplies_axis_tuple():
    # batch over (data, fsdp) = 2 x 4 = 8 devices: 12 rows do not split evenly.
    mesh = AbstractMesh((2, 4, 1), sharding.MESH_AXES)
    with pytest.raises(sharding.ShardingError, match=r"\(8 devices\)"):
        sharding.check_divisible((12, 5), PartitionSpec(("data", "fsdp")), mesh, what="batch")


def test_batch_multiple_is_data_times_fsdp():
    assert sharding.batch_multiple(AbstractMesh((2, 4, 1), sharding.MESH_AXES)) == 8


@pytest.mark.parametrize(
    "fields",
    [dict(tie_word_embeddings=True), dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)],
    ids=["tied", "untied_biases"],
)
def test_every_parameter_axis_has_rule(fields):
    axes = loading.param_logical_axes(abstract_model(tiny_models.tiny_config(**fields)))
    names = {name for spec in axes.values() for name in spec if name is not None}
    assert names, "no logical axis names found"
    assert names <= set(sharding.LOGICAL_AXIS_RULES), names - set(sharding.LOGICAL_AXIS_RULES)


def test_every_parameter_dimension_is_named():
    config = tiny_models.tiny_config(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    abstract = abstract_model(config)
    axes = loading.param_logical_axes(abstract)
    shapes = {name: value.shape for name, value in loading.convert_hf_state(tiny_models.hf_state(config), config).items()}
    for name, spec in axes.items():
        assert len(spec) == len(shapes[name]), name


def test_rules_map_only_to_mesh_axes():
    for name, target in sharding.LOGICAL_AXIS_RULES.items():
        targets = () if target is None else (target,) if isinstance(target, str) else target
        assert set(targets) <= set(sharding.MESH_AXES), name


def test_logical_to_spec_rejects_unknown_name():
    with pytest.raises(sharding.ShardingError, match="'experts'"):
        sharding.logical_to_spec(("batch", "experts"))


def test_logical_to_spec_maps_names():
    assert sharding.logical_to_spec(("batch", None, "heads")) == PartitionSpec(("data", "fsdp"), None, "tensor")


def test_constrain_without_mesh_is_identity():
    x = jnp.arange(6.0).reshape(2, 3)
    assert sharding.constrain(x, ("batch", "no_such_axis")) is x


def test_make_mesh_uses_all_devices():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == sharding.MESH_AXES
    assert mesh.devices.size == jax.device_count()
    assert np.prod(list(mesh.shape.values())) == jax.device_count()
