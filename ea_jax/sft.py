"""Supervised finetuning (SFT) of every parameter on chat conversations, with exact resume.

One jitted step is one optimizer update. It scans over `grad_accum_steps` micro-batches and
sums their token losses and gradients. It then divides by the number of target tokens in the
whole accumulated batch, so the update does not depend on how the batch is split.

The loss covers the assistant turn only, up to and including its end-of-turn token
(`ea_jax.chat.encode_with_assistant_mask`). Examples are shuffled by a grain pipeline, with a
new permutation each epoch, and right-padded to a multiple of 64 tokens so that few shapes compile.

An Orbax CheckpointManager under `<output_dir>/checkpoints` stores the parameters, the
optimizer state and the grain iterator position. A new `train` call on the same output
folder restores the latest checkpoint and continues, and reaches the same parameters as a run
that never stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from ea_jax import sharding
from ea_jax.chat import ChatTemplateError, Message, encode_with_assistant_mask, format_mask_audit
from ea_jax.loading import LoadedModel
from ea_jax.model import causal_mask, positions_from_mask

logger = logging.getLogger(__name__)

LENGTH_MULTIPLE = 64  # padded lengths are multiples of this, so at most max_length / 64 shapes compile
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"

Batch = dict[str, jax.Array]  # input_ids, input_mask, loss_mask: [B, T] or [A, B, T] with A = grad_accum_steps
TrainStep = Callable[[nnx.State, optax.OptState, Batch], tuple[nnx.State, optax.OptState, Batch]]

# SFTConfig fields that change the numbers a resumed run computes. A checkpoint written under
# other values of these fields is rejected instead of silently continued.
RESUME_FIELDS = (
    "learning_rate", "warmup_steps", "num_steps", "batch_size", "grad_accum_steps", "max_grad_norm",
    "weight_decay", "b1", "b2", "max_length", "seed",
)


class SFTError(ValueError):
    """Training data, a configuration or a checkpoint that SFT cannot use."""


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Hyperparameters of one finetuning run. Steps count optimizer updates."""

    learning_rate: float = 2e-5  # peak of the warmup-cosine schedule, which ends at 0 at num_steps
    warmup_steps: int = 10  # linear warmup from 0 to learning_rate
    num_steps: int = 200  # total optimizer updates of the run, over every resume
    batch_size: int = 8  # examples per micro-batch; a multiple of the mesh's data x fsdp size
    grad_accum_steps: int = 1  # micro-batches per update, so one update uses batch_size * this examples
    max_grad_norm: float = 1.0  # gradients are clipped to this global L2 norm
    weight_decay: float = 0.0  # AdamW decoupled decay, applied to matrices only (not norm weights)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    max_length: int = 1024  # tokens per example after the chat template; longer examples raise
    seed: int = 0  # shuffling seed; epoch e uses seed + e
    checkpoint_every: int = 100  # steps between checkpoints; the last step of a call is always saved
    log_every: int = 10  # steps between log lines and TensorBoard points
    max_checkpoints_to_keep: int = 2

    def __post_init__(self):
        checks = [
            (name, getattr(self, name) >= 1, "an integer >= 1")
            for name in ("num_steps", "batch_size", "grad_accum_steps", "checkpoint_every", "log_every",
                         "max_checkpoints_to_keep")
        ]
        checks += [
            ("warmup_steps", 0 <= self.warmup_steps < self.num_steps,
             f"0 <= warmup_steps < num_steps={self.num_steps}"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("b1", 0 <= self.b1 < 1, "in [0, 1)"),
            ("b2", 0 <= self.b2 < 1, "in [0, 1)"),
            ("max_length", self.max_length >= 2, ">= 2, because a target token needs a token before it"),
            ("seed", 0 <= self.seed < 2**32, "in [0, 2**32), as grain requires"),
        ]
        for name, valid, expected in checks:
            if not valid:
                raise SFTError(f"SFTConfig.{name}={getattr(self, name)!r} is invalid; expected {expected}")

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum_steps


@dataclasses.dataclass(frozen=True)
class SFTResult:
    """Outcome of one `train` call."""

    params: nnx.State  # final parameters, sharded on the model's mesh
    metrics: list[dict[str, Any]]  # one dict per step run in this call
    checkpoint_dir: Path
    steps_run: int  # steps run in this call, which started after any restored checkpoint


# ---------------------------------------------------------------------------------------------
# Tokenization and batches.


def encode_examples(
    tokenizer, examples: Sequence[Sequence[Message]], eos_token_ids: Sequence[int], max_length: int
) -> list[dict[str, np.ndarray]]:
    """Tokenize each conversation with a 0/1 mask of its last (assistant) turn.

    Raises SFTError for conversations the template cannot mask and for any longer than
    `max_length`, naming their indices: examples are never truncated.
    """
    if not examples:
        raise SFTError("no training examples were given; pass at least one conversation")

    encoded, too_long = [], []
    for index, messages in enumerate(examples):
        try:
            ids, mask = encode_with_assistant_mask(tokenizer, messages, eos_token_ids)
        except ChatTemplateError as error:
            raise SFTError(f"example {index} cannot be used for training: {error}") from error
        if len(ids) > max_length:
            too_long.append((index, len(ids)))
            continue
        encoded.append({
            "input_ids": np.asarray(ids, np.int32),
            "loss_mask": np.asarray(mask, np.int32),
            "example_index": np.int64(index),
        })

    if too_long:
        listed = ", ".join(f"example {index} ({length} tokens)" for index, length in too_long[:10])
        more = f" and {len(too_long) - 10} more" if len(too_long) > 10 else ""
        raise SFTError(
            f"{len(too_long)} example(s) are longer than max_length={max_length}: {listed}{more}; "
            "raise SFTConfig.max_length or shorten or remove these examples (they are never truncated)"
        )
    return encoded


def data_digest(encoded: Sequence[dict[str, np.ndarray]]) -> str:
    """SHA-256 of the token ids and masks, to check that a resumed run trains on the same data."""
    digest = hashlib.sha256()
    for example in encoded:
        digest.update(example["input_ids"].tobytes())
        digest.update(example["loss_mask"].tobytes())
    return digest.hexdigest()


def padded_length(length: int) -> int:
    return -(-length // LENGTH_MULTIPLE) * LENGTH_MULTIPLE


def collate_batch(
    examples: Sequence[dict[str, np.ndarray]], grad_accum_steps: int, pad_token_id: int
) -> dict[str, np.ndarray]:
    """Right-pad `examples` to one length and split them into [grad_accum_steps, B, T] arrays.

    All micro-batches of an update share one padded length, so the scan over them has one shape.
    Raises SFTError when no token of the batch is a target, because the loss would be 0 / 0.
    """
    if len(examples) % grad_accum_steps:
        raise SFTError(f"{len(examples)} examples do not split into {grad_accum_steps} equal micro-batches")
    length = padded_length(max(len(example["input_ids"]) for example in examples))
    input_ids = np.full((len(examples), length), pad_token_id, np.int32)
    input_mask = np.zeros((len(examples), length), np.int32)
    loss_mask = np.zeros((len(examples), length), np.int32)
    for row, example in enumerate(examples):
        size = len(example["input_ids"])
        input_ids[row, :size] = example["input_ids"]
        input_mask[row, :size] = 1
        loss_mask[row, :size] = example["loss_mask"]

    example_index = np.asarray([int(example["example_index"]) for example in examples], np.int64)
    # Position 0 is never a prediction target: logits at t predict token t + 1.
    if not loss_mask[:, 1:].any():
        raise SFTError(
            f"the batch of examples {example_index.tolist()} has no target tokens; every example needs "
            "an assistant turn (check the chat template and the assistant mask)"
        )

    shape = (grad_accum_steps, len(examples) // grad_accum_steps, length)
    return {
        "input_ids": input_ids.reshape(shape),
        "input_mask": input_mask.reshape(shape),
        "loss_mask": loss_mask.reshape(shape),
        "example_index": example_index,
    }


def make_dataset(encoded: Sequence[dict[str, np.ndarray]], config: SFTConfig, pad_token_id: int) -> grain.MapDataset:
    """Shuffled, endlessly repeated, collated batches: item i is the batch of update i.

    `shuffle` before `repeat` draws a new permutation for every epoch (grain reseeds with
    seed + epoch), and batches run across epoch boundaries, so no example is dropped.
    """

    def collate(examples):
        return collate_batch(examples, config.grad_accum_steps, pad_token_id)

    return (
        grain.MapDataset.source(list(encoded))
        .shuffle(seed=config.seed)
        .repeat(None)
        .batch(config.examples_per_step, drop_remainder=True, batch_fn=collate)
    )


def make_data_iterator(dataset: grain.MapDataset) -> grain.DatasetIterator:
    """Start iterating `dataset`. The iterator's position (`get_state`) goes into every training checkpoint."""
    # Two threads collate ahead of the step; grain keeps the order and the state exact.
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> Batch:
    """Place the [A, B, T] arrays (A = grad_accum_steps) on the mesh with B split over the batch axes."""
    spec = PartitionSpec(None, *sharding.logical_to_spec(("batch", None)))
    batch_sharding = NamedSharding(mesh, spec)
    placed = {}
    for name in ("input_ids", "input_mask", "loss_mask"):
        value = batch[name]
        sharding.check_divisible(value.shape, spec, mesh, what=f"batch {name}")
        # Every process builds the whole host batch and passes on only the shards its devices own.
        # NOTE: tested on one process with several CPU devices; a multi-host run is untested.
        placed[name] = jax.make_array_from_callback(
            value.shape, batch_sharding, lambda index, value=value: value[index]
        )
    return placed


# ---------------------------------------------------------------------------------------------
# Loss, optimizer and the train step.


def sum_token_losses(params: nnx.State, graphdef: nnx.GraphDef, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token cross-entropies over target tokens of one [B, T] batch, and their count."""
    model = nnx.merge(graphdef, params)
    input_mask = batch["input_mask"]
    logits, _ = model(batch["input_ids"], positions_from_mask(input_mask), causal_mask(input_mask))  # [B, T, V]

    # Logits at t predict token t + 1, so the target of position t is token t + 1 and its weight
    # is the loss mask of t + 1.
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["input_ids"][:, 1:])  # [B, T-1]
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights)


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: Batch) -> jax.Array:
    """Mean cross-entropy per target token of a [B, T] batch."""
    loss_sum, num_targets = sum_token_losses(params, graphdef, batch)
    return loss_sum / num_targets


def make_schedule(config: SFTConfig) -> optax.Schedule:
    """Learning rate for update i: linear from 0 to the peak over warmup, then cosine to 0."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.num_steps,
        end_value=0.0,
    )


def _decay_mask(params: nnx.State) -> nnx.State:
    # Norm weights (1-D) are not decayed: shrinking them towards 0 only rescales activations.
    return jax.tree.map(lambda value: value.ndim >= 2, params)


def make_optimizer(config: SFTConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            make_schedule(config), b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=_decay_mask
        ),
    )


def _constrain_to_param_axes(tree: nnx.State) -> nnx.State:
    """Shard a params-shaped tree (gradients, accumulators) by the parameters' logical axes."""
    specs = nnx.get_partition_spec(tree)
    return jax.tree.map(lambda value, spec: sharding.constrain(value, tuple(spec)), tree, specs)


def make_train_step(
    graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, grad_accum_steps: int
) -> TrainStep:
    """Jitted `(params, opt_state, batch) -> (params, opt_state, metrics)`: one optimizer update.

    `batch` contains [grad_accum_steps, B, T] arrays. The loss is the token cross-entropy summed
    over all micro-batches divided by their total number of target tokens. `params` and
    `opt_state` are donated, so the caller must not reuse the arrays it passed in.
    """

    def train_step(params, opt_state, batch):
        if batch["input_ids"].shape[0] != grad_accum_steps:
            raise SFTError(
                f"batch has {batch['input_ids'].shape[0]} micro-batches but the step was built for "
                f"grad_accum_steps={grad_accum_steps}; collate the batch with the same grad_accum_steps"
            )

        def accumulate(carry, micro_batch):
            grad_sum, loss_sum = carry
            (micro_loss, _), grads = jax.value_and_grad(sum_token_losses, has_aux=True)(params, graphdef, micro_batch)
            grad_sum = _constrain_to_param_axes(jax.tree.map(jnp.add, grad_sum, grads))
            return (grad_sum, loss_sum + micro_loss), None

        zeros = _constrain_to_param_axes(jax.tree.map(jnp.zeros_like, params))
        (grad_sum, loss_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), batch)

        num_targets = jnp.sum(batch["loss_mask"][:, :, 1:]).astype(jnp.float32)
        grads = jax.tree.map(lambda grad: grad / num_targets, grad_sum)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss_sum / num_targets,
            "grad_norm": optax.global_norm(grads),  # before clipping
            "target_tokens": num_targets,
            "tokens": jnp.sum(batch["input_mask"]).astype(jnp.float32),
        }
        return params, opt_state, metrics

    return jax.jit(train_step, donate_argnums=(0, 1))


# ---------------------------------------------------------------------------------------------
# Training state on the mesh.


def _abstract(tree, shardings):
    def abstract_leaf(leaf, where):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where)

    return jax.tree.map(abstract_leaf, tree, shardings)


def param_shardings(params: nnx.State, mesh: Mesh) -> nnx.State:
    """Shardings of the parameters on `mesh`, from the logical axis names each parameter declares."""
    specs = nnx.get_partition_spec(params)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, sharding.logical_to_spec(tuple(spec))),
        specs,
        is_leaf=lambda leaf: isinstance(leaf, PartitionSpec),
    )


def opt_state_shardings(optimizer: optax.GradientTransformation, params: nnx.State, mesh: Mesh):
    """Shardings of the optimizer state: moments like their parameters, counters replicated."""
    abstract_state = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        optimizer,
        lambda _, where: where,
        abstract_state,
        param_shardings(params, mesh),
        transform_non_params=lambda _: replicated,
    )


def init_train_state(optimizer: optax.GradientTransformation, params: nnx.State, mesh: Mesh):
    """Copy `params` onto their shardings (the train step donates its input) and create the optimizer state."""
    params = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=param_shardings(params, mesh))(params)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, mesh))(params)
    return params, opt_state


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def make_checkpoint_manager(directory: Path, config: SFTConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def run_info(config: SFTConfig, model_id: str, digest: str, num_examples: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the numbers-changing config fields and the data."""
    return {
        "config": {name: getattr(config, name) for name in RESUME_FIELDS},
        "model_id": model_id,
        "data_sha256": digest,
        "num_examples": num_examples,
    }


def save_train_checkpoint(manager, step, params, opt_state, data_iterator, info) -> None:
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data_iterator=grain.checkpoint.CheckpointSave(data_iterator),
            run_info=ocp.args.JsonSave(info),
        ),
    )


def check_resumable(saved: dict[str, Any], expected: dict[str, Any], directory: Path) -> None:
    """Raise SFTError when a checkpoint was written by a run with other data or hyperparameters."""
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, now {value!r}"
        for key, value in expected.items()
        if saved.get(key) != value
    ]
    if differences:
        raise SFTError(
            f"the checkpoints in {directory} belong to another run ({'; '.join(differences)}); "
            "use a new output_dir, or restore the original config and examples to resume"
        )


def restore_train_checkpoint(manager, step, params_target, opt_state_target, data_iterator, info):
    """Restore parameters and optimizer state straight into the shardings of their targets,
    and move `data_iterator` to where the checkpointed run stopped."""
    saved = manager.restore(step, args=ocp.args.Composite(run_info=ocp.args.JsonRestore()))["run_info"]
    check_resumable(saved, info, Path(manager.directory))
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target),
            opt_state=ocp.args.StandardRestore(opt_state_target),
            data_iterator=grain.checkpoint.CheckpointRestore(data_iterator),
        ),
    )
    return restored["params"], restored["opt_state"]


# ---------------------------------------------------------------------------------------------
# Logging.


class TensorBoardWriter:
    """Scalar summaries under `logdir` through tf.summary; TensorFlow is imported at the first write.

    Summaries go through `tf.summary.write` with the scalars plugin's metadata rather than
    `tf.summary.scalar`, which needs the separate `tensorboard` package; TensorBoard shows both
    the same way.
    """

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self._writer = None
        self._disabled = jax.process_index() != 0  # one process writes for the whole run

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._disabled:
            return
        # Set before the import: hide TensorFlow's C++ info logs, and its oneDNN kernels, which
        # writing files does not use and whose notice TF 2.21 prints at any log level.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        try:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2
        except ImportError as error:
            logger.warning("TensorBoard summaries are off: %s; install tensorflow-cpu to write them", error)
            self._disabled = True
            return

        if self._writer is None:
            try:
                tf.config.set_visible_devices([], "GPU")  # leave accelerator memory to JAX
            except RuntimeError:
                pass  # TensorFlow was already initialised by the caller, who chose its devices
            self._writer = tf.summary.create_file_writer(str(self.logdir))
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR,
        )
        with self._writer.as_default():
            for name, value in scalars.items():
                tf.summary.write(f"train/{name}", tf.constant(value, tf.float32), step=step, metadata=metadata)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def summarize_window(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Scalars logged for the steps since the last log line: mean loss and grad norm, last learning
    rate and throughput over the window's wall time (the first window includes compilation)."""
    seconds = sum(record["seconds"] for record in records)
    return {
        "loss": float(np.mean([record["loss"] for record in records])),
        "grad_norm": float(np.mean([record["grad_norm"] for record in records])),
        "learning_rate": records[-1]["learning_rate"],
        "target_tokens_per_s": sum(record["target_tokens"] for record in records) / seconds,
        "tokens_per_s": sum(record["tokens"] for record in records) / seconds,
    }


# ---------------------------------------------------------------------------------------------
# Entry point.


def _check_setup(model: LoadedModel, config: SFTConfig, max_steps_per_call: int | None) -> None:
    multiple = sharding.batch_multiple(model.mesh)
    if config.batch_size % multiple:
        raise SFTError(
            f"SFTConfig.batch_size={config.batch_size} is not a multiple of {multiple}, the mesh's data x fsdp "
            f"size; set batch_size to a multiple of {multiple}"
        )
    if config.max_length > model.config.max_position_embeddings:
        raise SFTError(
            f"SFTConfig.max_length={config.max_length} exceeds the model's max_position_embeddings="
            f"{model.config.max_position_embeddings}; lower max_length"
        )
    if max_steps_per_call is not None and max_steps_per_call < 1:
        raise SFTError(f"max_steps_per_call={max_steps_per_call} is invalid; expected None or an integer >= 1")


def train(
    model: LoadedModel,
    examples: Sequence[Sequence[Message]],
    config: SFTConfig,
    output_dir: str | Path,
    *,
    max_steps_per_call: int | None = None,
) -> SFTResult:
    """Finetune `model` on `examples` (conversations ending in an assistant turn) up to config.num_steps.

    Resumes from the latest checkpoint in `<output_dir>/checkpoints` when there is one. With
    `max_steps_per_call`, stops after that many steps (for time-limited jobs) and saves a
    checkpoint there; a later call continues. `model.params` is left unchanged.
    """
    output_dir = Path(output_dir)
    _check_setup(model, config, max_steps_per_call)

    encoded = encode_examples(model.tokenizer, examples, model.eos_token_ids, config.max_length)
    first = encoded[0]
    logger.info(
        "mask audit of example %d ([T] marks target tokens):\n%s",
        int(first["example_index"]),
        format_mask_audit(model.tokenizer, first["input_ids"].tolist(), first["loss_mask"].tolist()),
    )
    pad_token_id = model.tokenizer.pad_token_id
    pad_token_id = model.eos_token_ids[0] if pad_token_id is None else int(pad_token_id)
    data_iterator = make_data_iterator(make_dataset(encoded, config, pad_token_id))
    info = run_info(config, model.model_id, data_digest(encoded), len(encoded))

    optimizer = make_optimizer(config)
    checkpoint_dir = (output_dir / CHECKPOINT_DIR).absolute()
    manager = make_checkpoint_manager(checkpoint_dir, config)
    writer = TensorBoardWriter(output_dir / TENSORBOARD_DIR)
    try:
        start_step = manager.latest_step()
        if start_step is None:
            start_step = 0
            params, opt_state = init_train_state(optimizer, model.params, model.mesh)
        else:
            params_target = _abstract(model.params, param_shardings(model.params, model.mesh))
            opt_state_target = _abstract(
                jax.eval_shape(optimizer.init, model.params), opt_state_shardings(optimizer, model.params, model.mesh)
            )
            params, opt_state = restore_train_checkpoint(
                manager, start_step, params_target, opt_state_target, data_iterator, info
            )
            logger.info("resumed from step %d in %s", start_step, checkpoint_dir)

        end_step = config.num_steps
        if max_steps_per_call is not None:
            end_step = min(end_step, start_step + max_steps_per_call)
        num_targets = sum(int(example["loss_mask"][1:].sum()) for example in encoded)
        logger.info(
            "SFT of %s on %d examples (%d target tokens): steps %d..%d of %d, %d examples per step "
            "(%d x %d micro-batches), %.2f epochs in all, mesh %s",
            model.model_id, len(encoded), num_targets, start_step + 1, end_step, config.num_steps,
            config.examples_per_step, config.batch_size, config.grad_accum_steps,
            config.num_steps * config.examples_per_step / len(encoded), dict(model.mesh.shape),
        )

        params, opt_state, history = _run_steps(
            model, config, params, opt_state, data_iterator, range(start_step + 1, end_step + 1),
            optimizer, manager, writer, info,
        )
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()

    return SFTResult(params=params, metrics=history, checkpoint_dir=checkpoint_dir, steps_run=len(history))


def _run_steps(model, config, params, opt_state, data_iterator, steps, optimizer, manager, writer, info):
    """Run the updates numbered `steps` (1-based), logging and checkpointing on the way."""
    train_step = make_train_step(model.graphdef, optimizer, config.grad_accum_steps)
    schedule = make_schedule(config)
    history: list[dict[str, Any]] = []
    window: list[dict[str, Any]] = []
    last_step = steps[-1] if len(steps) else None

    with jax.set_mesh(model.mesh), tqdm(
        total=config.num_steps, initial=steps.start - 1, desc="sft", disable=jax.process_index() != 0
    ) as progress:
        for step in steps:
            started = time.perf_counter()
            batch = next(data_iterator)
            params, opt_state, device_metrics = train_step(params, opt_state, put_batch(batch, model.mesh))
            metrics = {name: float(value) for name, value in jax.device_get(device_metrics).items()}
            seconds = time.perf_counter() - started

            record = {
                "step": step,
                "learning_rate": float(schedule(step - 1)),  # the rate this update used
                **metrics,
                "seconds": seconds,
                "target_tokens_per_s": metrics["target_tokens"] / seconds,
                "tokens_per_s": metrics["tokens"] / seconds,
                "example_indices": batch["example_index"].tolist(),
            }
            history.append(record)
            window.append(record)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}")

            if step % config.log_every == 0 or step == last_step:
                summary = summarize_window(window)
                logger.info(
                    "step %d/%d: loss %.4f, learning rate %.3g, grad norm %.3f, %.0f target tokens/s, %.0f tokens/s",
                    step, config.num_steps, summary["loss"], summary["learning_rate"], summary["grad_norm"],
                    summary["target_tokens_per_s"], summary["tokens_per_s"],
                )
                writer.write_scalars(step, summary)
                window = []
            if step % config.checkpoint_every == 0 or step == last_step:
                save_train_checkpoint(manager, step, params, opt_state, data_iterator, info)
    return params, opt_state, history
