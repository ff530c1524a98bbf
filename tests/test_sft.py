"""Tests for SFT: masks, loss, schedule, gradient accumulation and exact resume on a tiny model.

The model has random weights and odd, distinct sizes. Only the vocabulary is full size, because
the examples are tokenized with the packaged SmolLM2 tokenizer (49152 tokens).
"""

import glob
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ea_jax import loading, sft, sharding
from ea_jax.model import ModelConfig, forward, init_model

CONFIG = ModelConfig(
    vocab_size=49152,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)

# Answers of different lengths, so that a per-micro-batch mean would differ from the token mean.
EXAMPLES = [
    [{"role": "user", "content": f"Name colour number {number}."}, {"role": "assistant", "content": answer}]
    for number, answer in enumerate(["Red.", "Green, like grass in spring.", "Blue.", "Cyan, a light blue.", "Magenta."])
]


@pytest.fixture(scope="module")
def tokenizer():
    return loading.gguf_tokenizer(loading.find_default_gguf())


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh()


def tiny_model(tokenizer, mesh, seed=0) -> loading.LoadedModel:
    """A fresh random model on the mesh, as `load_model` would return it."""
    graphdef, state = nnx.split(init_model(CONFIG, seed=seed), nnx.Param)
    params = jax.device_put(state, sft.param_shardings(state, mesh))
    eos = (tokenizer.eos_token_id,)
    return loading.LoadedModel(CONFIG, graphdef, params, tokenizer, "tiny@test", "test", mesh, eos)


def small_config(**overrides) -> sft.SFTConfig:
    fields = dict(
        learning_rate=1e-2, warmup_steps=1, num_steps=6, batch_size=1, grad_accum_steps=2, max_length=128,
        weight_decay=0.01, checkpoint_every=2, log_every=2, max_checkpoints_to_keep=2, seed=7,
    )
    fields.update(overrides)
    return sft.SFTConfig(**fields)


def encode(tokenizer, examples=EXAMPLES, max_length=128):
    return sft.encode_examples(tokenizer, examples, (tokenizer.eos_token_id,), max_length)


def max_abs_difference(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------
# Masks and batches.


def test_mask_covers_assistant_turn_and_end_of_turn(tokenizer):
    messages = EXAMPLES[3]
    example = encode(tokenizer, [messages])[0]
    ids, mask = example["input_ids"], example["loss_mask"].astype(bool)

    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[~mask]) == prompt
    assert tokenizer.decode(ids[mask]) == "Cyan, a light blue.<|im_end|>"
    assert ids[-1] == tokenizer.eos_token_id
    assert mask[-1]


def test_collate_right_pads_to_multiple_of_64(tokenizer):
    encoded = encode(tokenizer)[:4]
    batch = sft.collate_batch(encoded, grad_accum_steps=2, pad_token_id=0)

    longest = max(len(example["input_ids"]) for example in encoded)
    assert batch["input_ids"].shape == (2, 2, 64)
    assert longest < 64
    first = encoded[0]
    size = len(first["input_ids"])
    assert np.array_equal(batch["input_ids"][0, 0, :size], first["input_ids"])
    assert np.array_equal(batch["loss_mask"][0, 0, :size], first["loss_mask"])
    assert batch["input_mask"][0, 0, :size].all()
    assert not batch["input_mask"][0, 0, size:].any()
    assert batch["example_index"].tolist() == [0, 1, 2, 3]


def test_collate_without_targets_raises(tokenizer):
    encoded = encode(tokenizer)[:2]
    for example in encoded:
        example["loss_mask"] = np.zeros_like(example["loss_mask"])
    with pytest.raises(sft.SFTError, match="no target tokens"):
        sft.collate_batch(encoded, grad_accum_steps=1, pad_token_id=0)


def test_encode_too_long_example_raises_with_index(tokenizer):
    long_answer = " ".join(["word"] * 200)
    examples = [EXAMPLES[0], [EXAMPLES[1][0], {"role": "assistant", "content": long_answer}], EXAMPLES[2]]
    with pytest.raises(sft.SFTError, match=r"example 1 \(\d+ tokens\)") as error:
        encode(tokenizer, examples, max_length=128)
    assert "example 0" not in str(error.value)
    assert "max_length" in str(error.value)


def test_encode_without_assistant_turn_raises_with_index(tokenizer):
    examples = [EXAMPLES[0], EXAMPLES[1][:1]]
    with pytest.raises(sft.SFTError, match="example 1 "):
        encode(tokenizer, examples)


# ---------------------------------------------------------------------------------------------
# Loss, schedule and the train step.


def numpy_masked_cross_entropy(logits: np.ndarray, ids: np.ndarray, loss_mask: np.ndarray) -> float:
    """Mean next-token cross-entropy over target tokens, written from the definition."""
    total, count = 0.0, 0
    for row in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not loss_mask[row, t + 1]:
                continue
            row_logits = logits[row, t].astype(np.float64)
            log_probs = row_logits - row_logits.max() - np.log(np.exp(row_logits - row_logits.max()).sum())
            total -= log_probs[ids[row, t + 1]]
            count += 1
    return total / count


def test_loss_matches_numpy_cross_entropy(tokenizer, mesh):
    model = tiny_model(tokenizer, mesh)
    batch = sft.collate_batch(encode(tokenizer)[:2], grad_accum_steps=1, pad_token_id=0)
    micro = {name: jnp.asarray(batch[name][0]) for name in ("input_ids", "input_mask", "loss_mask")}

    loss = float(sft.loss_fn(model.params, model.graphdef, micro))

    logits = np.asarray(forward(model.graphdef, model.params, micro["input_ids"], micro["input_mask"]))
    expected = numpy_masked_cross_entropy(logits, batch["input_ids"][0], batch["loss_mask"][0])
    assert loss == pytest.approx(expected, rel=1e-5)


def test_schedule_warmup_then_cosine():
    config = small_config(learning_rate=1e-3, warmup_steps=4, num_steps=20)
    schedule = sft.make_schedule(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(2)) == pytest.approx(5e-4)
    assert float(schedule(4)) == pytest.approx(1e-3)
    assert float(schedule(12)) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert float(schedule(20)) == pytest.approx(0.0, abs=1e-12)


def test_config_warmup_not_below_num_steps_raises():
    with pytest.raises(sft.SFTError, match="warmup_steps=6"):
        small_config(warmup_steps=6, num_steps=6)


def test_grad_accumulation_matches_full_batch(tokenizer, mesh):
    model = tiny_model(tokenizer, mesh)
    encoded = encode(tokenizer)[:4]
    # SGD, so that the update is proportional to the gradient (Adam's first step is not).
    optimizer = optax.sgd(0.5)
    results = {}
    for accum in (1, 2):
        batch = sft.collate_batch(encoded, grad_accum_steps=accum, pad_token_id=0)
        device_batch = sft.put_batch(batch, mesh)
        params = jax.tree.map(jnp.copy, model.params)
        step = sft.make_train_step(model.graphdef, optimizer, accum)
        with jax.set_mesh(mesh):
            results[accum] = step(params, optimizer.init(params), device_batch)

    (params_full, _, metrics_full), (params_accum, _, metrics_accum) = results[1], results[2]
    assert float(metrics_accum["loss"]) == pytest.approx(float(metrics_full["loss"]), rel=1e-6)
    assert float(metrics_accum["grad_norm"]) == pytest.approx(float(metrics_full["grad_norm"]), rel=1e-5)
    assert float(metrics_accum["target_tokens"]) == float(metrics_full["target_tokens"])
    assert max_abs_difference(params_full, params_accum) < 1e-5
    assert max_abs_difference(params_full, model.params) > 1e-3


def test_train_step_wrong_micro_batch_count_raises(tokenizer, mesh):
    model = tiny_model(tokenizer, mesh)
    batch = sft.put_batch(sft.collate_batch(encode(tokenizer)[:4], grad_accum_steps=2, pad_token_id=0), mesh)
    optimizer = optax.sgd(0.1)
    step = sft.make_train_step(model.graphdef, optimizer, grad_accum_steps=4)
    params = jax.tree.map(jnp.copy, model.params)
    with pytest.raises(sft.SFTError, match="grad_accum_steps=4"):
        step(params, optimizer.init(params), batch)


# ---------------------------------------------------------------------------------------------
# Training runs.


def read_scalar_tags(logdir) -> set[str]:
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    tags = set()
    for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_train_reduces_loss_and_logs(tokenizer, mesh, tmp_path):
    model = tiny_model(tokenizer, mesh)
    original = jax.tree.map(jnp.copy, model.params)
    config = small_config(num_steps=8, warmup_steps=1, batch_size=2, grad_accum_steps=1)

    result = sft.train(model, EXAMPLES[:2], config, tmp_path)

    losses = [record["loss"] for record in result.metrics]
    assert result.steps_run == 8
    assert losses[-1] < 0.7 * losses[0]
    schedule = sft.make_schedule(config)
    assert [record["learning_rate"] for record in result.metrics] == [float(schedule(i)) for i in range(8)]
    assert max_abs_difference(model.params, original) == 0.0
    assert isinstance(result.params, nnx.State)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s"} <= read_scalar_tags(
        tmp_path / "tensorboard"
    )


def test_resume_is_exact(tokenizer, mesh, tmp_path):
    config = small_config()

    straight = sft.train(tiny_model(tokenizer, mesh), EXAMPLES, config, tmp_path / "straight")
    # Each call below rebuilds the model, optimizer, pipeline and checkpoint manager from scratch.
    first = sft.train(tiny_model(tokenizer, mesh), EXAMPLES, config, tmp_path / "resumed", max_steps_per_call=3)
    second = sft.train(tiny_model(tokenizer, mesh), EXAMPLES, config, tmp_path / "resumed")

    resumed_metrics = first.metrics + second.metrics
    assert (first.steps_run, second.steps_run) == (3, 3)
    assert [record["step"] for record in resumed_metrics] == [1, 2, 3, 4, 5, 6]
    assert [r["example_indices"] for r in resumed_metrics] == [r["example_indices"] for r in straight.metrics]
    assert [r["loss"] for r in resumed_metrics] == [r["loss"] for r in straight.metrics]
    assert max_abs_difference(second.params, straight.params) <= 1e-6
    assert isinstance(second.params, nnx.State)

    finished = sft.train(tiny_model(tokenizer, mesh), EXAMPLES, config, tmp_path / "resumed")
    assert finished.steps_run == 0
    assert max_abs_difference(finished.params, straight.params) == 0.0


def test_data_order_reshuffles_each_epoch(tokenizer, mesh, tmp_path):
    encoded = encode(tokenizer)
    dataset = sft.make_dataset(encoded, small_config(batch_size=5, grad_accum_steps=1), pad_token_id=0)
    iterator = sft.make_data_iterator(dataset)
    epochs = [next(iterator)["example_index"].tolist() for _ in range(3)]
    assert all(sorted(order) == [0, 1, 2, 3, 4] for order in epochs)
    assert len({tuple(order) for order in epochs}) > 1


def test_resume_with_other_config_raises(tokenizer, mesh, tmp_path):
    config = small_config(num_steps=2, warmup_steps=0)
    sft.train(tiny_model(tokenizer, mesh), EXAMPLES, config, tmp_path, max_steps_per_call=1)
    other = small_config(num_steps=2, warmup_steps=0, learning_rate=1e-3)
    with pytest.raises(sft.SFTError, match="learning_rate"):
        sft.train(tiny_model(tokenizer, mesh), EXAMPLES, other, tmp_path)


# Runs in a fresh process because the number of CPU devices is fixed when JAX starts.
SHARDED_RUN = textwrap.dedent(
    """
    import jax
    from flax import nnx
    from ea_jax import loading, sft, sharding
    from ea_jax.model import ModelConfig, init_model

    config = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    tokenizer = loading.gguf_tokenizer(loading.find_default_gguf())
    examples = [[{"role": "user", "content": f"Say {word}."}, {"role": "assistant", "content": word}]
                for word in ["one", "two", "three", "four"]]

    def run(mesh, output_dir, batch_size):
        graphdef, state = nnx.split(init_model(config), nnx.Param)
        params = jax.device_put(state, sft.param_shardings(state, mesh))
        eos = (tokenizer.eos_token_id,)
        model = loading.LoadedModel(config, graphdef, params, tokenizer, "tiny", "test", mesh, eos)
        settings = sft.SFTConfig(learning_rate=1e-2, warmup_steps=0, num_steps=2, batch_size=batch_size, max_length=128)
        return sft.train(model, examples, settings, output_dir)

    sharded_mesh = sharding.make_mesh((1, 2, 1))
    try:
        run(sharded_mesh, "{tmp}/odd", batch_size=1)
        raise AssertionError("batch_size=1 on 2 fsdp devices did not raise")
    except sft.SFTError as error:
        assert "multiple of 2" in str(error), error

    sharded = run(sharded_mesh, "{tmp}/sharded", batch_size=2)
    single = run(sharding.make_mesh((1, 1, 1), jax.devices()[:1]), "{tmp}/single", batch_size=2)
    for a, b in zip(sharded.metrics, single.metrics):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"], (a["loss"], b["loss"])

    embedding = sharded.params["embed_tokens"][...]
    assert embedding.sharding.spec == sharding.logical_to_spec(("vocab", "embed")), embedding.sharding

    optimizer = sft.make_optimizer(sft.SFTConfig())
    _, opt_state = sft.init_train_state(optimizer, sharded.params, sharded_mesh)
    moment = opt_state[1][0].mu["embed_tokens"][...]
    assert moment.sharding.spec == embedding.sharding.spec, moment.sharding
    print("sharded run ok")
    """
)


def test_train_on_two_device_mesh(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    completed = subprocess.run(
        [sys.executable, "-c", SHARDED_RUN.replace("{tmp}", str(tmp_path))],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "sharded run ok" in completed.stdout
