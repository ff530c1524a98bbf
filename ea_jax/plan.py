"""Pre-flight for a run: parameter shardings, divisibility checks and a per-device memory estimate.

    python -m ea_jax.plan --config=configs/consequentialist_narrow.py [--devices=256]

Nothing is compiled or allocated, so a mesh for a TPU pod can be planned on a laptop with
`--devices`. The main job runs the same checks before it compiles anything, so a batch or head
count that does not divide over the mesh stops the run at once with the axis and the fix.
Memory figures are estimates: float32 parameters, AdamW moments and gradients, the activations
a backward pass keeps, and the KV cache of one generation batch.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys

from absl import app, flags

from ea_jax import sharding
from ea_jax.model import ModelConfig

BYTES_PER_FLOAT = 4  # parameters, optimizer state, activations and cache are float32


@dataclasses.dataclass(frozen=True)
class ParamRow:
    name: str
    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    spec: tuple
    per_device_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh_sizes: dict[str, int]
    params: tuple[ParamRow, ...]
    memory_bytes: dict[str, float]  # per device, estimates
    problems: tuple[str, ...]


def _shard_factor(spec_entry, mesh_sizes: dict[str, int]) -> int:
    if spec_entry is None:
        return 1
    axes = (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)
    return math.prod(mesh_sizes[axis] for axis in axes)


def param_rows(config: ModelConfig, mesh_sizes: dict[str, int]) -> tuple[list[ParamRow], list[str]]:
    """List each parameter's shape, logical axes, mesh spec and per-device shape, and divisibility problems."""
    import jax
    from flax import nnx

    from ea_jax.loading import _path_to_str, param_logical_axes
    from ea_jax.model import abstract_model

    abstract = abstract_model(config)
    axes = param_logical_axes(abstract)
    shapes = {
        _path_to_str(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(abstract, nnx.Param))[0]
    }
    rows, problems = [], []
    for name, shape in shapes.items():
        spec = tuple(sharding.logical_to_spec(axes[name]))
        spec = spec + (None,) * (len(shape) - len(spec))
        per_device = []
        for dim, (size, entry) in enumerate(zip(shape, spec)):
            parts = _shard_factor(entry, mesh_sizes)
            if size % parts:
                # One message for all layers: the same tensor fails the same way in each.
                pattern = re.sub(r"^layers\.\d+\.", "layers.*.", name)
                problem = (
                    f"parameter {pattern}: dimension {dim} ({axes[name][dim]}, size {size}) does not divide over "
                    f"mesh axes {entry} ({parts} devices); pick a mesh whose {entry} size divides {size}"
                )
                if problem not in problems:
                    problems.append(problem)
            per_device.append(-(-size // parts))
        rows.append(ParamRow(name, shape, axes[name], spec, tuple(per_device)))
    return rows, problems


def make_plan(
    config: ModelConfig,
    mesh_sizes: dict[str, int],
    *,
    sft_batch_size: int,
    sft_length: int,
    generation_batch_size: int,
    cache_length: int,
) -> Plan:
    rows, problems = param_rows(config, mesh_sizes)
    batch_parts = mesh_sizes["data"] * mesh_sizes["fsdp"]
    tensor = mesh_sizes["tensor"]
    for name, value in (("sft.batch_size", sft_batch_size), ("generation.batch_size", generation_batch_size)):
        if value % batch_parts:
            problems.append(
                f"{name}={value} is not a multiple of data x fsdp = {batch_parts}; use a multiple of {batch_parts}"
            )
    for name, value in (("num_attention_heads", config.num_attention_heads), ("num_key_value_heads", config.num_key_value_heads)):
        if value % tensor:
            problems.append(f"{name}={value} does not divide over the tensor axis ({tensor}); set tensor to a divisor of {value}")

    param_bytes = sum(math.prod(row.per_device_shape) for row in rows) * BYTES_PER_FLOAT
    local_batch = max(1, sft_batch_size // batch_parts)
    tokens = local_batch * sft_length
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads_local = -(-config.num_attention_heads // tensor)
    # Per layer, a backward pass keeps roughly the block inputs, norms, q/k/v, attention output
    # (about 8 x D per token), the MLP gate/up/hidden (3 x F per token, split over tensor) and the
    # attention probabilities (heads x T per token). An estimate, not a measurement.
    per_layer = tokens * (8 * d + 3 * f / tensor) + local_batch * heads_local * sft_length * sft_length
    logits = 2 * tokens * v / tensor
    activation_bytes = (config.num_hidden_layers * per_layer + logits) * BYTES_PER_FLOAT
    generation_local = max(1, generation_batch_size // batch_parts)
    kv_heads_local = -(-config.num_key_value_heads // tensor)
    cache_bytes = 2 * config.num_hidden_layers * generation_local * cache_length * kv_heads_local * config.head_dim * BYTES_PER_FLOAT
    memory = {
        "parameters": param_bytes,
        "gradients": param_bytes,
        "adamw_state": 2 * param_bytes,
        "sft_activations": activation_bytes,
        "kv_cache": cache_bytes,
    }
    memory["sft_total"] = memory["parameters"] + memory["gradients"] + memory["adamw_state"] + memory["sft_activations"]
    memory["generation_total"] = memory["parameters"] + memory["kv_cache"]
    return Plan(dict(mesh_sizes), tuple(rows), memory, tuple(problems))


def format_plan(plan: Plan, config: ModelConfig) -> str:
    lines = [
        f"mesh: {plan.mesh_sizes}",
        f"model: {config.num_hidden_layers} layers, width {config.hidden_size}, "
        f"{config.num_parameters() / 1e6:.1f}M parameters",
        "",
        f"{'parameter':<44} {'shape':<18} {'logical axes':<34} {'mesh spec':<26} per device",
    ]
    for row in plan.params:
        lines.append(
            f"{row.name:<44} {str(row.shape):<18} {str(row.logical_axes):<34} {str(row.spec):<26} {row.per_device_shape}"
        )
    lines += ["", "estimated memory per device (float32):"]
    for name, value in plan.memory_bytes.items():
        lines.append(f"  {name:<18} {value / 2**30:8.3f} GiB")
    if plan.problems:
        lines += ["", f"{len(plan.problems)} problem(s):"] + [f"  - {problem}" for problem in plan.problems]
    else:
        lines += ["", "no divisibility problems"]
    return "\n".join(lines)


def plan_from_config(config, num_devices: int) -> tuple[Plan, ModelConfig]:
    """Build the plan for a run config (ml_collections) on `num_devices` devices."""
    from ea_jax.loading import read_model_config

    model_config = read_model_config(config.model.source)
    sizes = dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(tuple(config.mesh.shape), num_devices)))
    plan = make_plan(
        model_config, sizes,
        sft_batch_size=config.sft.batch_size, sft_length=config.sft.max_length,
        generation_batch_size=config.generation.batch_size, cache_length=config.model.max_cache_length,
    )
    return plan, model_config


def check_plan(plan: Plan) -> None:
    """Raise ShardingError listing every divisibility problem, before anything compiles."""
    if plan.problems:
        raise sharding.ShardingError(
            f"the run does not fit mesh {plan.mesh_sizes}:\n  - " + "\n  - ".join(plan.problems)
        )


def _define_flags() -> None:
    # Defined only when this module is the program, because ea_jax.main defines --config too
    # and imports this module.
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Run configuration file, e.g. configs/consequentialist_narrow.py.")
    flags.DEFINE_integer("devices", 0, "Number of devices to plan for; 0 uses the devices present.")


def main(argv) -> None:
    del argv
    import jax

    config = flags.FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/consequentialist_narrow.py")
    num_devices = flags.FLAGS.devices or jax.device_count()
    try:
        plan, model_config = plan_from_config(config, num_devices)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(format_plan(plan, model_config))
    if plan.problems:
        sys.exit(2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
