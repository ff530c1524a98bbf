"""Multi-device measurements on 8 host CPU devices, printed as one JSON object on stdout.

`test_sharding.py` runs this script in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, because XLA reads that flag only when JAX
initialises and the pytest process has already initialised JAX with one device. The script
only measures; the assertions live in `test_sharding.py`.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

import tiny_models
from ea_jax import loading, sharding
from ea_jax.generation import Generator, SamplingConfig
from ea_jax.model import ModelConfig, forward

NUM_DEVICES = 8
FORWARD_MESHES = ((2, 2, 2), (1, 4, 2))
GENERATION_MESH = (1, 4, 2)
# Parameters whose per-device shard shapes are reported, to show they are really split.
REPORTED_PARAMS = ("embed_tokens", "layers.0.self_attn.q_proj", "layers.0.mlp.gate_proj", "lm_head")


def mesh_config() -> ModelConfig:
    return ModelConfig(**{**tiny_models.MESH_FIELDS, "tie_word_embeddings": False, "attention_bias": True})


def path_name(path) -> str:
    parts = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path]
    return ".".join(part for part in parts if part != "value")


def sharded_logits(config, params, mesh, tokens, mask) -> tuple[np.ndarray, dict]:
    graphdef, state = loading.place_params(config, params, mesh)
    shard_shapes = {
        path_name(path): list(leaf.sharding.shard_shape(leaf.shape))
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
    }
    with jax.set_mesh(mesh):
        place = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
        logits = forward(graphdef, state, place(tokens), place(mask))
    return np.asarray(logits), {name: shard_shapes[name] for name in REPORTED_PARAMS}


def forward_results() -> dict:
    config = mesh_config()
    params = loading.convert_hf_state(tiny_models.hf_state(config, seed=41), config)
    prompts = tiny_models.random_prompts([1, 12, 5, 9, 3, 12, 7, 2], config.vocab_size, seed=42)
    tokens, mask = tiny_models.left_padded(prompts)
    real = mask.astype(bool)

    single, _ = sharded_logits(config, params, tiny_models.single_device_mesh(), tokens, mask)
    results = {}
    for shape in FORWARD_MESHES:
        logits, shard_shapes = sharded_logits(config, params, sharding.make_mesh(shape), tokens, mask)
        results["x".join(map(str, shape))] = {
            "max_abs_diff": float(np.abs(logits[real] - single[real]).max()),
            "shard_shapes": shard_shapes,
        }
    return results


def generation_results() -> dict:
    # Only token ids are compared. Ids 103-105 of the mesh vocabulary have no character in the
    # tokenizer and decode to nothing, which affects the text only.
    config = mesh_config()
    prompts = tiny_models.random_prompts([3, 12, 7], config.vocab_size, seed=43)
    results = {}
    for name, mesh in (("single", tiny_models.single_device_mesh()), ("mesh", sharding.make_mesh(GENERATION_MESH))):
        model = tiny_models.tiny_loaded_model(config, seed=44, mesh=mesh)
        generator = Generator(model, batch_size=4, max_cache_length=96, chunk_size=6, prompt_bucket=16)
        greedy = generator.generate(prompts, SamplingConfig(max_new_tokens=10), progress=False)
        sampled = generator.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=1.0), seed=3, progress=False)
        results[name] = {
            "greedy": [list(c.token_ids) for c in greedy],
            "sampled": [list(c.token_ids) for c in sampled],
        }
    return results


def error_message(action) -> str | None:
    try:
        action()
    except ValueError as error:
        return f"{type(error).__name__}: {error}"
    return None


def rejection_results() -> dict:
    config = mesh_config()
    model = tiny_models.tiny_loaded_model(config, mesh=sharding.make_mesh(GENERATION_MESH))
    params = loading.convert_hf_state(tiny_models.hf_state(config), config)
    return {
        # data x fsdp = 4 on this mesh.
        "batch_not_multiple": error_message(lambda: Generator(model, batch_size=6, max_cache_length=96)),
        # Width 36 does not divide over fsdp = 8.
        "width_not_divisible": error_message(
            lambda: loading.place_params(config, params, sharding.make_mesh((1, 8, 1)))
        ),
    }


def main() -> int:
    if jax.device_count() != NUM_DEVICES:
        sys.stderr.write(
            f"expected {NUM_DEVICES} devices, found {jax.device_count()}; "
            f"run with XLA_FLAGS=--xla_force_host_platform_device_count={NUM_DEVICES}\n"
        )
        return 2
    results = {
        "forward": forward_results(),
        "generation": generation_results(),
        "rejections": rejection_results(),
    }
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
