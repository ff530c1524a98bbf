"""Export to a Hugging Face folder: transformers loads it back with the same logits and prompts."""

import numpy as np
import pytest
import torch
import transformers

import tiny_models
from ea_jax import export, loading
from ea_jax.model import forward

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_model():
    tokenizer = tiny_models.char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tiny_models.tiny_loaded_model(tiny_models.tiny_config(tie_word_embeddings=False), seed=5, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    return export.export_hf_folder(tiny_model, tmp_path_factory.mktemp("export") / "model")


def test_export_writes_expected_files(exported):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (exported / name).is_file(), name


def test_export_logits_match_transformers(tiny_model, exported):
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(exported), torch_dtype=torch.float32).eval()
    tokens, mask = tiny_models.right_padded(tiny_models.random_prompts([7, 4], tiny_model.config.vocab_size, seed=1))

    ours = np.asarray(forward(tiny_model.graphdef, tiny_model.params, tokens, mask))
    with torch.no_grad():
        theirs = reference(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask)).logits.numpy()

    real = mask.astype(bool)
    # float32 on both sides; 1e-4 covers summation-order differences of the two backends.
    assert np.abs(ours[real] - theirs[real]).max() < 1e-4


def test_export_tokenizer_keeps_chat_template(tiny_model, exported):
    reloaded = transformers.AutoTokenizer.from_pretrained(str(exported))
    messages = [{"role": "user", "content": "hi there"}]

    expected = tiny_model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


def test_export_reloads_with_same_params(tiny_model, exported):
    reloaded = loading.load_model(str(exported), mesh=tiny_model.mesh)
    ours = loading.params_to_hf_state(tiny_model.config, tiny_model.params)
    theirs = loading.params_to_hf_state(reloaded.config, reloaded.params)

    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_export_refuses_existing_folder(tiny_model, exported):
    with pytest.raises(export.ExportError, match="already exists"):
        export.export_hf_folder(tiny_model, exported)
