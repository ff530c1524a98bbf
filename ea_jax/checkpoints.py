"""Finetuned-model folders: what `save_checkpoint_folder` writes and `load_model(folder)` reads.

A folder contains everything needed to rebuild the model without its source:

    config.json          ModelConfig.to_hf_config(), the Hugging Face field names
    tokenizer.json, tokenizer_config.json, chat_template.jinja   from tokenizer.save_pretrained
                         (transformers 5 keeps the chat template in its own .jinja file)
    ea_jax_model.json    model id, source model id, end-of-sequence ids, creation time (UTC)
    params/              the parameters as a nested dict ('layers' -> 0 -> 'mlp' -> ...), written by Orbax

The folder is written under a temporary name and renamed when complete, so a folder with the
final name is always whole. Parameters are restored straight into their shards on the mesh.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from ea_jax import sharding
from ea_jax.loading import CHECKPOINT_PARAMS_DIR, LoadedModel, ModelLoadError, hf_tokenizer, param_logical_axes
from ea_jax.model import ModelConfig, ModelConfigError, abstract_model

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METADATA_FILE = "ea_jax_model.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be written where requested."""


def _dotted_path(path) -> str:
    return ".".join(str(key.key) for key in path)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path} not found; {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error}); {fix}") from error


def _check_params_match(config: ModelConfig, params: nnx.State) -> None:
    """Raise CheckpointError unless `params` has exactly the parameters and shapes `config` declares."""
    _, expected_state = nnx.split(abstract_model(config), nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path
    expected = {_dotted_path(path): tuple(leaf.shape) for path, leaf in flat(expected_state.to_pure_dict())[0]}
    actual = {_dotted_path(path): tuple(leaf.shape) for path, leaf in flat(params.to_pure_dict())[0]}
    if actual != expected:
        different = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
        examples = [f"{name}: got {actual.get(name)}, expected {expected.get(name)}" for name in different[:3]]
        raise CheckpointError(
            f"{len(different)} parameter(s) do not match the model config, e.g. {examples}; "
            "save params of the model whose LoadedModel you pass"
        )


def save_checkpoint_folder(model: LoadedModel, params: nnx.State, folder: str | Path, *, model_id: str) -> Path:
    """Write `params` with `model`'s config and tokenizer to `folder`, which must not exist yet.

    `model_id` names the finetuned model in every record made with it; `model.model_id` is
    stored as its source. Returns the folder path.
    """
    folder = Path(folder).absolute()
    if folder.exists():
        raise CheckpointError(f"{folder} already exists; choose a new folder or delete the old one first")
    if jax.process_count() > 1:
        # NOTE: multi-process saving is not written yet. Orbax would save from every process,
        # but the JSON files and the final rename need process 0 alone, after a barrier.
        raise CheckpointError(
            f"save_checkpoint_folder runs on one process, but jax.process_count() is {jax.process_count()}"
        )

    _check_params_match(model.config, params)

    # The folder appears under its final name only once complete, so a crash mid-write
    # leaves an obviously temporary folder behind and never a partial checkpoint.
    temporary = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)  # left by an earlier crashed save from a process with this pid
    temporary.parent.mkdir(parents=True, exist_ok=True)
    temporary.mkdir()
    try:
        _write_json(temporary / CONFIG_FILE, model.config.to_hf_config())
        model.tokenizer.save_pretrained(str(temporary))
        _write_json(
            temporary / METADATA_FILE,
            {
                "format_version": FORMAT_VERSION,
                "model_id": model_id,
                "source_model_id": model.model_id,
                "eos_token_ids": list(model.eos_token_ids),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(temporary / CHECKPOINT_PARAMS_DIR, params.to_pure_dict())
        checkpointer.wait_until_finished()
        checkpointer.close()
        os.rename(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise

    logger.info("saved %s to %s (source %s)", model_id, folder, model.model_id)
    return folder


def _restore_params(folder: Path, config: ModelConfig, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    abstract = abstract_model(config)
    graphdef, state = nnx.split(abstract, nnx.Param)
    axes = param_logical_axes(abstract)

    def target(path, leaf):
        name = _dotted_path(path)
        spec = sharding.logical_to_spec(axes[name])
        sharding.check_divisible(leaf.shape, spec, mesh, what=f"parameter {name}")
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    targets = jax.tree_util.tree_map_with_path(target, state.to_pure_dict())
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(folder / CHECKPOINT_PARAMS_DIR, targets)
    except Exception as error:  # Orbax and TensorStore raise many types for missing or damaged files
        raise ModelLoadError(
            f"cannot restore the parameters in {folder / CHECKPOINT_PARAMS_DIR} for the architecture in "
            f"{folder / CONFIG_FILE} ({type(error).__name__}: {error}); the folder is damaged or its "
            "config.json belongs to other weights, so save it again with save_checkpoint_folder"
        ) from error
    finally:
        checkpointer.close()

    nnx.replace_by_pure_dict(state, restored)
    return graphdef, state


def load_checkpoint_folder(folder: str | Path, mesh: Mesh) -> LoadedModel:
    """Load a folder written by `save_checkpoint_folder`, each parameter straight into its shards."""
    folder = Path(folder)
    fix = "the folder is incomplete or was not written by ea_jax.checkpoints.save_checkpoint_folder; save it again"
    if not folder.is_dir():
        raise ModelLoadError(f"checkpoint folder {folder} not found; check the path")
    if not (folder / CHECKPOINT_PARAMS_DIR).is_dir():
        raise ModelLoadError(f"{folder / CHECKPOINT_PARAMS_DIR} not found; {fix}")

    try:
        config = ModelConfig.from_hf_config(_read_json(folder / CONFIG_FILE, fix))
    except (ModelConfigError, KeyError) as error:
        raise ModelLoadError(f"{folder / CONFIG_FILE} is not a usable model config ({error}); {fix}") from error
    metadata = _read_json(folder / METADATA_FILE, fix)
    missing = [key for key in ("model_id", "eos_token_ids") if key not in metadata]
    if missing:
        raise ModelLoadError(f"{folder / METADATA_FILE} lacks {missing}; {fix}")

    try:
        tokenizer = hf_tokenizer(folder)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as error:  # transformers reports missing tokenizer files as either
        raise ModelLoadError(f"cannot load the tokenizer in {folder} ({error}); {fix}") from error
    graphdef, params = _restore_params(folder, config, mesh)
    eos_token_ids = tuple(int(token) for token in metadata["eos_token_ids"])
    logger.info(
        "loaded %s from %s (source %s): %d layers, %.1fM parameters",
        metadata["model_id"], folder, metadata.get("source_model_id"), config.num_hidden_layers,
        config.num_parameters() / 1e6,
    )
    return LoadedModel(config, graphdef, params, tokenizer, metadata["model_id"], str(folder), mesh, eos_token_ids)
