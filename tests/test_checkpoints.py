"""Tests for finetuned-model folders: round trip through `load_model`, atomic writes, damaged folders."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ea_jax import checkpoints, loading, sharding
from ea_jax.model import ModelConfig, forward, init_model

# Orbax 0.12.8 abandons its pending read coroutines when a restore fails. They warn whenever
# they are collected, which may be during a later test, so the filter covers the module.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CONFIG = ModelConfig(
    vocab_size=49152,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    eos_token_id=2,
)


@pytest.fixture(scope="module")
def model():
    tokenizer = loading.gguf_tokenizer(loading.find_default_gguf())
    mesh = sharding.make_mesh()
    graphdef, params = nnx.split(init_model(CONFIG, seed=3), nnx.Param)
    return loading.LoadedModel(CONFIG, graphdef, params, tokenizer, "tiny@test", "test", mesh, (2,))


@pytest.fixture(scope="module")
def saved_folder(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints") / "tiny-ft"
    checkpoints.save_checkpoint_folder(model, model.params, folder, model_id="tiny-ft@test")
    return folder




def copy_folder(folder, tmp_path):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def test_round_trip_gives_identical_logits(model, saved_folder):
    loaded = loading.load_model(str(saved_folder), model.mesh)

    tokens = jnp.asarray([[1, 4093, 198, 36218, 2382, 30], [1, 9690, 198, 2683, 0, 0]], jnp.int32)
    input_mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], jnp.int32)
    expected = forward(model.graphdef, model.params, tokens, input_mask)
    actual = forward(loaded.graphdef, loaded.params, tokens, input_mask)
    assert np.array_equal(np.asarray(actual), np.asarray(expected))


def test_round_trip_keeps_metadata(model, saved_folder):
    loaded = loading.load_model(str(saved_folder), model.mesh)
    assert loaded.config == model.config
    assert loaded.model_id == "tiny-ft@test"
    assert loaded.eos_token_ids == (2,)
    assert loaded.source == str(saved_folder)
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template
    metadata = json.loads((saved_folder / checkpoints.METADATA_FILE).read_text())
    assert metadata["source_model_id"] == "tiny@test"


def test_round_trip_places_params_on_mesh(model, saved_folder):
    loaded = loading.load_model(str(saved_folder), model.mesh)
    embedding = loaded.params["embed_tokens"][...]
    assert embedding.sharding == sharding.named_sharding(model.mesh, ("vocab", "embed"))


def test_save_leaves_no_temporary_folder(saved_folder):
    leftovers = [path.name for path in saved_folder.parent.iterdir() if ".tmp-" in path.name]
    assert leftovers == []


def test_save_into_existing_folder_raises(model, saved_folder):
    with pytest.raises(checkpoints.CheckpointError, match="already exists"):
        checkpoints.save_checkpoint_folder(model, model.params, saved_folder, model_id="again")


def test_save_params_of_other_model_raises(model, tmp_path):
    other_config = dataclasses.replace(CONFIG, intermediate_size=40)
    _, other_params = nnx.split(init_model(other_config), nnx.Param)
    with pytest.raises(checkpoints.CheckpointError, match="do not match the model config"):
        checkpoints.save_checkpoint_folder(model, other_params, tmp_path / "other", model_id="other")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_nothing(model, tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    broken = loading.LoadedModel(
        model.config, model.graphdef, model.params, BrokenTokenizer(), model.model_id, "test", model.mesh, (2,)
    )
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint_folder(broken, model.params, tmp_path / "broken", model_id="broken")
    assert list(tmp_path.iterdir()) == []


def test_missing_params_dir_raises(model, saved_folder, tmp_path):
    folder = copy_folder(saved_folder, tmp_path)
    shutil.rmtree(folder / loading.CHECKPOINT_PARAMS_DIR)
    with pytest.raises(loading.ModelLoadError):
        loading.load_model(str(folder), model.mesh)
    with pytest.raises(loading.ModelLoadError, match="params not found"):
        checkpoints.load_checkpoint_folder(folder, model.mesh)


def test_missing_metadata_raises(model, saved_folder, tmp_path):
    folder = copy_folder(saved_folder, tmp_path)
    (folder / checkpoints.METADATA_FILE).unlink()
    with pytest.raises(loading.ModelLoadError, match="ea_jax_model.json not found"):
        loading.load_model(str(folder), model.mesh)


def test_config_of_other_weights_raises(model, saved_folder, tmp_path):
    folder = copy_folder(saved_folder, tmp_path)
    config = json.loads((folder / checkpoints.CONFIG_FILE).read_text())
    config["intermediate_size"] = 40
    (folder / checkpoints.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(loading.ModelLoadError, match="cannot restore the parameters"):
        loading.load_model(str(folder), model.mesh)


def test_damaged_params_raise(model, saved_folder, tmp_path):
    folder = copy_folder(saved_folder, tmp_path)
    for path in (folder / loading.CHECKPOINT_PARAMS_DIR).rglob("*"):
        if path.is_file() and path.name != "_CHECKPOINT_METADATA":
            path.write_bytes(b"not a checkpoint")
    with pytest.raises(loading.ModelLoadError, match="cannot restore the parameters"):
        loading.load_model(str(folder), model.mesh)


def test_round_trip_of_changed_params(model, tmp_path):
    changed = jax.tree.map(lambda value: value + 0.5, model.params)
    folder = checkpoints.save_checkpoint_folder(model, changed, tmp_path / "changed", model_id="changed")
    loaded = checkpoints.load_checkpoint_folder(folder, model.mesh)
    for expected, actual in zip(jax.tree.leaves(changed), jax.tree.leaves(loaded.params)):
        assert np.array_equal(np.asarray(actual), np.asarray(expected))
