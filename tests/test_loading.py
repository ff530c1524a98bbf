"""Loading: the packaged GGUF against transformers, Hugging Face folders, and every rejection path."""

import json

import numpy as np
import pytest

import tiny_models
from ea_jax import loading
from ea_jax.chat import encode_chat, user_turn
from ea_jax.model import forward
from torch_reference import build_torch_llama, left_padding_positions, torch_logits

# float32 on both sides. SmolLM2-135M has 30 layers and logits of order 10-20. A different
# summation order (XLA vs. PyTorch kernels) gave a max difference of 1.3e-4 on a 5-token
# prompt, so 1e-3 leaves margin while a wrong weight layout moves logits by whole units.
PACKAGED_FP32_ATOL = 1e-3

# Tiny random models (logits of order 1-30): reordered float32 sums differ by about 2e-5.
TINY_FP32_ATOL = 1e-4

SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

PLAIN_PROMPTS = {
    "one_token": "Hello",
    "short": "The capital of France is",
    "paragraph": (
        "A lighthouse keeper kept a logbook of every ship that passed the rocky point. Over forty "
        "years the entries changed from sails to steam to diesel, and the handwriting grew shakier, "
        "but the times were always written to the minute."
    ),
}
CHAT_PROMPTS = {
    "chat_single_turn": [{"role": "user", "content": "What is the boiling point of water at sea level?"}],
    "chat_multi_turn": [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a prime number larger than ten."},
        {"role": "assistant", "content": "Eleven is a prime number larger than ten."},
        {"role": "user", "content": "And one larger than twenty?"},
    ],
}


def prompt_ids(tokenizer, name: str) -> list[int]:
    if name in PLAIN_PROMPTS:
        return list(tokenizer(PLAIN_PROMPTS[name])["input_ids"])
    return encode_chat(tokenizer, CHAT_PROMPTS[name])


# ---------------------------------------------------------------------------------------------
# The packaged model against transformers.


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(PLAIN_PROMPTS) + sorted(CHAT_PROMPTS))
def test_packaged_logits_match_torch(packaged_model, packaged_reference, name):
    ids = prompt_ids(packaged_model.tokenizer, name)
    tokens = np.asarray([ids], np.int32)
    mask = np.ones_like(tokens)

    ours = np.asarray(forward(packaged_model.graphdef, packaged_model.params, *tiny_models.as_jax(tokens, mask)))
    expected = torch_logits(packaged_reference, tokens, mask)

    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= PACKAGED_FP32_ATOL


@pytest.mark.integration
def test_packaged_prompt_lengths_differ(packaged_model):
    lengths = {name: len(prompt_ids(packaged_model.tokenizer, name)) for name in (*PLAIN_PROMPTS, *CHAT_PROMPTS)}
    assert len(set(lengths.values())) == len(lengths), lengths


@pytest.mark.integration
def test_packaged_left_padded_batch_matches_torch(packaged_model, packaged_reference):
    prompts = [prompt_ids(packaged_model.tokenizer, name) for name in (*PLAIN_PROMPTS, *CHAT_PROMPTS)]
    tokens, mask = tiny_models.left_padded(prompts, pad_id=packaged_model.tokenizer.pad_token_id)

    ours = np.asarray(forward(packaged_model.graphdef, packaged_model.params, *tiny_models.as_jax(tokens, mask)))
    expected = torch_logits(packaged_reference, tokens, mask, position_ids=left_padding_positions(mask))

    real = mask.astype(bool)
    assert np.abs(ours[real] - expected[real]).max() <= PACKAGED_FP32_ATOL


@pytest.mark.integration
def test_packaged_config_matches_smollm2(packaged_model):
    config = packaged_model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert config.rope_theta == 100000.0


@pytest.mark.integration
def test_packaged_model_id_and_eos(packaged_model):
    assert packaged_model.model_id.startswith(f"{loading.DEFAULT_GGUF_FILE}@sha256:")
    assert packaged_model.eos_token_ids == (packaged_model.tokenizer.convert_tokens_to_ids("<|im_end|>"),)


# ---------------------------------------------------------------------------------------------
# The GGUF tokenizer.


@pytest.mark.integration
def test_gguf_chat_template_single_turn(packaged_tokenizer):
    text = packaged_tokenizer.apply_chat_template(user_turn("Hi"), tokenize=False, add_generation_prompt=True)
    expected = (
        f"<|im_start|>system\n{SMOLLM_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text == expected


@pytest.mark.integration
def test_gguf_chat_template_multi_turn(packaged_tokenizer):
    text = packaged_tokenizer.apply_chat_template(
        CHAT_PROMPTS["chat_multi_turn"], tokenize=False, add_generation_prompt=False
    )
    expected = (
        "<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n"
        "<|im_start|>user\nName a prime number larger than ten.<|im_end|>\n"
        "<|im_start|>assistant\nEleven is a prime number larger than ten.<|im_end|>\n"
        "<|im_start|>user\nAnd one larger than twenty?<|im_end|>\n"
    )
    assert text == expected


@pytest.mark.integration
def test_gguf_chat_markers_are_single_tokens(packaged_tokenizer):
    ids = encode_chat(packaged_tokenizer, user_turn("Hi"))
    start = packaged_tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = packaged_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids[0] == start
    assert ids.count(start) == 3
    assert ids.count(end) == 2


@pytest.mark.integration
def test_gguf_tokenizer_round_trips_text(packaged_tokenizer):
    text = "Tabs\tand  double spaces, émigré café, 3.14 and emoji 🙂 survive."
    ids = packaged_tokenizer(text)["input_ids"]
    assert packaged_tokenizer.decode(ids) == text


# ---------------------------------------------------------------------------------------------
# Hugging Face folders.


@pytest.mark.integration
@pytest.mark.parametrize(
    "variant, shard_size",
    [
        ("tied", None),
        ("untied_biases", "20KB"),  # several shards plus model.safetensors.index.json
    ],
)
def test_hf_folder_round_trip(tmp_path, packaged_tokenizer, variant, shard_size):
    fields = {"tied": dict(tie_word_embeddings=True), "untied_biases": dict(attention_bias=True, mlp_bias=True)}
    config = tiny_models.tiny_config(**fields[variant])
    reference = build_torch_llama(config, tiny_models.hf_state(config, seed=11))
    reference.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    packaged_tokenizer.save_pretrained(tmp_path)
    if shard_size:
        assert len(list(tmp_path.glob("*.safetensors"))) > 1

    loaded = loading.load_model(str(tmp_path), mesh=tiny_models.single_device_mesh())
    tokens, mask = tiny_models.left_padded(tiny_models.random_prompts([8, 3], config.vocab_size, seed=12))
    ours = np.asarray(forward(loaded.graphdef, loaded.params, *tiny_models.as_jax(tokens, mask)))
    expected = torch_logits(reference, tokens, mask, position_ids=left_padding_positions(mask))

    assert loaded.config == config
    assert np.abs(ours - expected)[mask.astype(bool)].max() <= TINY_FP32_ATOL
    assert loaded.model_id.startswith(f"{tmp_path.name}@sha256:")


@pytest.mark.integration
def test_hf_folder_keeps_tokenizer_template(tmp_path, packaged_tokenizer):
    config = tiny_models.tiny_config()
    build_torch_llama(config, tiny_models.hf_state(config)).save_pretrained(tmp_path)
    packaged_tokenizer.save_pretrained(tmp_path)

    loaded = loading.load_model(str(tmp_path), mesh=tiny_models.single_device_mesh())
    messages = CHAT_PROMPTS["chat_multi_turn"]

    assert encode_chat(loaded.tokenizer, messages) == encode_chat(packaged_tokenizer, messages)


@pytest.mark.integration
def test_hf_folder_reads_generation_config_eos(tmp_path, packaged_tokenizer):
    config = tiny_models.tiny_config()
    build_torch_llama(config, tiny_models.hf_state(config)).save_pretrained(tmp_path)
    packaged_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))

    loaded = loading.load_model(str(tmp_path), mesh=tiny_models.single_device_mesh())

    # 1 from config.json, 2 (<|im_end|>) from the tokenizer, 7 and 9 from generation_config.json.
    assert loaded.eos_token_ids == (1, 2, 7, 9)


def write_config(folder, config=None) -> None:
    config = config or tiny_models.tiny_config()
    (folder / "config.json").write_text(json.dumps(config.to_hf_config()))


def test_hf_folder_with_only_pickle_rejected(tmp_path):
    write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(loading.ModelLoadError, match="pickle") as error:
        loading.load_model(str(tmp_path), mesh=tiny_models.single_device_mesh())
    assert "pytorch_model.bin" in str(error.value)


def test_hf_folder_without_config_rejected(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(loading.ModelLoadError, match="config.json"):
        loading.read_hf_folder(tmp_path)


def test_hf_folder_unsupported_architecture_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**tiny_models.tiny_config().to_hf_config(), "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2'"):
        loading.read_hf_folder(tmp_path)


def test_missing_source_rejected(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(loading.ModelLoadError, match="no_such_model"):
        loading.load_model(str(missing), mesh=tiny_models.single_device_mesh())


def test_non_gguf_file_rejected(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(loading.ModelLoadError, match="neither a .gguf file nor a folder"):
        loading.load_model(str(path), mesh=tiny_models.single_device_mesh())


# ---------------------------------------------------------------------------------------------
# GGUF files.


def test_corrupt_gguf_rejected(tmp_path):
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(loading.ModelLoadError, match="corrupt.gguf"):
        loading.load_model(str(path), mesh=tiny_models.single_device_mesh())


def test_empty_gguf_rejected(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(loading.ModelLoadError, match="not a readable GGUF"):
        loading.read_gguf(path)


@pytest.mark.integration
def test_truncated_gguf_rejected(tmp_path, packaged_gguf_path):
    path = tmp_path / "truncated.gguf"
    with open(packaged_gguf_path, "rb") as handle:
        path.write_bytes(handle.read(2_000_000))  # complete header, tensor data cut short
    with pytest.raises(loading.ModelLoadError, match="not a readable GGUF"):
        loading.read_gguf(path)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The row permutation llama.cpp's converter applies to Q and K weights, from its definition.

    Each head's rows (H of them) are split into two halves of H/2 and interleaved, so row j of
    the first half and row j of the second half become rows 2j and 2j+1.
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("num_heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(num_heads):
    weight = np.random.default_rng(num_heads).normal(size=(num_heads * 8, 5)).astype(np.float32)
    permuted = llama_cpp_permute(weight, num_heads)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(loading.unpermute_gguf_qk(permuted, num_heads), weight)


def test_unpermute_single_head_by_hand():
    # One head of head_dim 4: llama.cpp stores Hugging Face rows [0, 1 | 2, 3] as [0, 2, 1, 3].
    stored = np.array([[0.0], [2.0], [1.0], [3.0]])
    np.testing.assert_array_equal(loading.unpermute_gguf_qk(stored, 1), [[0.0], [1.0], [2.0], [3.0]])


# ---------------------------------------------------------------------------------------------
# State-dict conversion and placement.


def test_convert_hf_state_rejects_unknown_tensor():
    config = tiny_models.tiny_config()
    state = tiny_models.hf_state(config)
    state["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    with pytest.raises(loading.ModelLoadError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        loading.convert_hf_state(state, config)


def test_convert_hf_state_skips_rotary_buffer_and_tied_head():
    config = tiny_models.tiny_config(tie_word_embeddings=True)
    state = tiny_models.hf_state(config)
    plain = loading.convert_hf_state(state, config)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()

    assert sorted(loading.convert_hf_state(state, config)) == sorted(plain)


def test_convert_then_invert_is_identity():
    config = tiny_models.tiny_config(attention_bias=True, mlp_bias=True, num_key_value_heads=3)
    state = tiny_models.hf_state(config, seed=4)
    _, placed = loading.place_params(
        config, loading.convert_hf_state(state, config), tiny_models.single_device_mesh()
    )
    back = loading.params_to_hf_state(config, placed)

    assert sorted(back) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_place_params_reports_missing_tensor():
    config = tiny_models.tiny_config()
    params = loading.convert_hf_state(tiny_models.hf_state(config), config)
    del params["layers.2.mlp.up_proj"]
    with pytest.raises(loading.ModelLoadError, match="1 missing") as error:
        loading.place_params(config, params, tiny_models.single_device_mesh())
    assert "layers.2.mlp.up_proj" in str(error.value)


def test_place_params_reports_wrong_shape():
    config = tiny_models.tiny_config()
    params = loading.convert_hf_state(tiny_models.hf_state(config), config)
    params["layers.1.self_attn.k_proj"] = np.zeros((42, 3, 8), np.float32)
    with pytest.raises(loading.ModelLoadError, match="wrong shape") as error:
        loading.place_params(config, params, tiny_models.single_device_mesh())
    assert "layers.1.self_attn.k_proj: got (42, 3, 8), expected (42, 2, 8)" in str(error.value)


def test_place_params_reports_unexpected_tensor():
    config = tiny_models.tiny_config(tie_word_embeddings=True)
    params = loading.convert_hf_state(tiny_models.hf_state(config), config)
    params["lm_head"] = np.zeros((42, 103), np.float32)
    with pytest.raises(loading.ModelLoadError, match="1 unexpected") as error:
        loading.place_params(config, params, tiny_models.single_device_mesh())
    assert "lm_head" in str(error.value)


def test_place_params_reports_all_problems_at_once():
    config = tiny_models.tiny_config()
    params = loading.convert_hf_state(tiny_models.hf_state(config), config)
    del params["norm.weight"]
    params["layers.0.mlp.down_proj"] = np.zeros((5, 5), np.float32)
    params["layers.9.mlp.up_proj"] = np.zeros((42, 56), np.float32)
    with pytest.raises(loading.ModelLoadError) as error:
        loading.place_params(config, params, tiny_models.single_device_mesh())
    message = str(error.value)
    assert "norm.weight" in message
    assert "layers.0.mlp.down_proj" in message
    assert "layers.9.mlp.up_proj" in message
