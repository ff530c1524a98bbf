"""Device mesh and the one table that maps logical axis names onto it.

Layers name the axes of their parameters and activations (`embed`, `heads`, `batch`, ...) and
never devices. `LOGICAL_AXIS_RULES` decides where each name lives on a mesh with the axes
`data`, `fsdp` and `tensor`. A single CPU device is the 1x1x1 mesh, so the same code runs
everywhere.

Axis letters used in shape comments across the package:
B batch, T query length, S key/cache length, D model width (embed), N query heads,
K key/value heads, G query heads per key/value head, H head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    # Activations.
    "batch": ("data", "fsdp"),
    "length": None,
    "kv_length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # Parameters: FSDP shards the model width, tensor parallelism shards heads, MLP and vocab.
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}


class ShardingError(ValueError):
    """A mesh shape or logical axis that cannot be used."""


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """Return the (data, fsdp, tensor) sizes, with at most one -1 meaning "the rest"."""
    shape = tuple(int(size) for size in shape)
    if len(shape) != len(MESH_AXES):
        raise ShardingError(
            f"mesh shape {shape} has {len(shape)} entries; expected one size per axis "
            f"{MESH_AXES}, for example (1, -1, 1)"
        )
    if shape.count(-1) > 1:
        raise ShardingError(f"mesh shape {shape} has more than one -1; at most one axis may take 'the rest'")
    if any(size == 0 or size < -1 for size in shape):
        raise ShardingError(f"mesh shape {shape} has an invalid size; use positive sizes or -1")

    known = math.prod(size for size in shape if size != -1)
    if -1 in shape:
        if num_devices % known:
            raise ShardingError(
                f"mesh shape {shape} cannot fill {num_devices} devices: {num_devices} is not a multiple of {known}"
            )
        shape = tuple(num_devices // known if size == -1 else size for size in shape)
    if math.prod(shape) != num_devices:
        raise ShardingError(
            f"mesh shape {shape} uses {math.prod(shape)} devices but {num_devices} are available; "
            f"set sizes whose product is {num_devices} or use -1 for one axis"
        )
    return shape  # type: ignore[return-value]


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a Mesh with axes (data, fsdp, tensor) over `devices` (default: all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(shape, len(devices))
    mesh = Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)
    logger.info("mesh %s over %d %s device(s)", dict(zip(MESH_AXES, sizes)), len(devices), devices[0].platform)
    return mesh


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec through LOGICAL_AXIS_RULES."""
    mesh_axes = []
    for name in names:
        if name is None:
            mesh_axes.append(None)
            continue
        if name not in LOGICAL_AXIS_RULES:
            raise ShardingError(
                f"logical axis {name!r} has no rule; add it to LOGICAL_AXIS_RULES in ea_jax/sharding.py "
                f"(known: {sorted(LOGICAL_AXIS_RULES)})"
            )
        mesh_axes.append(LOGICAL_AXIS_RULES[name])
    return PartitionSpec(*mesh_axes)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Apply a sharding constraint by logical names when a mesh is set, else return x.

    Inside `jax.set_mesh(mesh)` the constraint tells XLA where the activation should live;
    without a mesh (plain single-device calls) it is a no-op.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, what: str) -> None:
    """Raise ShardingError unless every sharded dimension divides evenly over its mesh axes."""
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        parts = math.prod(mesh.shape[axis] for axis in axes)
        if size % parts:
            raise ShardingError(
                f"{what}: dimension {dim} of size {size} is sharded over mesh axes {axes} "
                f"({parts} devices) and does not divide evenly; change the mesh shape so that "
                f"{'x'.join(axes)} divides {size}, or set that axis to 1"
            )


def named_sharding(mesh: Mesh, names: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names))


def shard_array(value, mesh: Mesh, names: Sequence[str | None], what: str) -> jax.Array:
    """Place a host array on the mesh according to its logical axis names."""
    spec = logical_to_spec(names)
    check_divisible(np.shape(value), spec, mesh, what)
    return jax.device_put(value, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding for a [B, ...] input: batch over data x fsdp, the rest replicated."""
    return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1))


def batch_multiple(mesh: Mesh) -> int:
    """Number of ways the batch axis is split; batches must be a multiple of it."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
