"""Generation: greedy tokens against transformers' `generate`, and the engine on tiny random models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_models
from ea_jax import generation
from ea_jax.chat import encode_chat, user_turn
from ea_jax.generation import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Generator,
    PromptTooLongError,
    SamplingConfig,
    batch_bucket,
    filter_logits,
    sample_tokens,
)
from ea_jax.model import forward

GREEDY_32 = SamplingConfig(max_new_tokens=32)

# Chat prompts whose rendered lengths differ clearly (31, 37, 45 and 59 tokens with SmolLM2's template).
PACKAGED_QUESTIONS = [
    "Hi",
    "What is 2+2?",
    "Write a short poem about the sea and the wind in autumn, please.",
    "Explain in detail how a bicycle works, including gears, brakes, and the chain, "
    "for a ten-year-old child who is curious.",
]


# ---------------------------------------------------------------------------------------------
# The packaged model against transformers' generate.


def torch_greedy(reference, prompts: list[list[int]], eos_id: int, max_new_tokens: int = 32) -> list[list[int]]:
    """New tokens of transformers' greedy `generate` on a left-padded batch, cut before the first EOS."""
    tokens, mask = tiny_models.left_padded(prompts, pad_id=eos_id)
    with torch.no_grad():
        output = reference.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=eos_id,
            eos_token_id=eos_id,
        )
    new_tokens = output[:, tokens.shape[1] :].tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in new_tokens]


@pytest.fixture(scope="module")
def packaged_generator(packaged_model):
    return Generator(packaged_model, batch_size=4, max_cache_length=256, chunk_size=32, prompt_bucket=32)


@pytest.fixture(scope="module")
def packaged_prompts(packaged_model):
    return [encode_chat(packaged_model.tokenizer, user_turn(question)) for question in PACKAGED_QUESTIONS]


@pytest.fixture(scope="module")
def packaged_batch_completions(packaged_generator, packaged_prompts):
    return packaged_generator.generate(packaged_prompts, GREEDY_32, progress=False)


@pytest.mark.integration
def test_packaged_prompts_differ_in_length(packaged_prompts):
    lengths = [len(prompt) for prompt in packaged_prompts]
    assert len(set(lengths)) == len(lengths)
    assert max(lengths) - min(lengths) >= 20


@pytest.mark.integration
def test_greedy_matches_torch_batch_1(packaged_generator, packaged_prompts, packaged_reference, packaged_model):
    prompt = packaged_prompts[-1]
    (completion,) = packaged_generator.generate([prompt], GREEDY_32, progress=False)
    (expected,) = torch_greedy(packaged_reference, [prompt], packaged_model.eos_token_ids[0])

    assert list(completion.token_ids) == expected
    assert len(expected) == 32  # the whole budget is compared, not a short reply


@pytest.mark.integration
def test_greedy_matches_torch_batch_4(packaged_batch_completions, packaged_prompts, packaged_reference, packaged_model):
    expected = torch_greedy(packaged_reference, packaged_prompts, packaged_model.eos_token_ids[0])
    for index, (completion, reference_tokens) in enumerate(zip(packaged_batch_completions, expected)):
        assert list(completion.token_ids) == reference_tokens, f"prompt {index}: {PACKAGED_QUESTIONS[index]!r}"


@pytest.mark.integration
def test_greedy_finish_reasons(packaged_batch_completions):
    # Short questions end with <|im_end|> within 32 tokens; the two long requests do not.
    reasons = [completion.finish_reason for completion in packaged_batch_completions]
    assert reasons == [FINISH_EOS, FINISH_EOS, FINISH_LENGTH, FINISH_LENGTH]


@pytest.mark.integration
def test_greedy_reply_is_sensible(packaged_batch_completions):
    # Parity with torch cannot catch a weight-reading bug that both sides share (both read the
    # GGUF through `read_gguf`); a correct answer can.
    assert "4" in packaged_batch_completions[1].text


@pytest.mark.integration
def test_completion_records_prompt_length(packaged_batch_completions, packaged_prompts):
    assert [c.num_prompt_tokens for c in packaged_batch_completions] == [len(p) for p in packaged_prompts]


# ---------------------------------------------------------------------------------------------
# Sampling functions.


def test_filter_logits_top_k_keeps_exactly_k():
    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 103))
    filtered = np.asarray(filter_logits(logits, SamplingConfig(temperature=1.0, top_k=5)))

    for row in range(3):
        kept = set(np.flatnonzero(np.isfinite(filtered[row])).tolist())
        assert kept == set(np.argsort(np.asarray(logits[row]))[-5:].tolist())
        np.testing.assert_array_equal(filtered[row, sorted(kept)], np.asarray(logits[row])[sorted(kept)])


# Probabilities 0.5, 0.2, 0.15, 0.1, 0.05 at shuffled positions; the nucleus is the smallest set
# of most likely tokens whose mass reaches top_p.
NUCLEUS_PROBS = np.array([0.1, 0.5, 0.05, 0.2, 0.15])


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.3, {1}),  # 0.5 alone reaches 0.3
        (0.55, {1, 3}),  # 0.5 + 0.2
        (0.8, {1, 3, 4}),  # 0.5 + 0.2 + 0.15 = 0.85
        (0.9, {1, 3, 4, 0}),  # 0.95
        (1.0, {0, 1, 2, 3, 4}),  # disabled
    ],
)
def test_filter_logits_top_p_keeps_smallest_nucleus(top_p, kept):
    logits = jnp.log(jnp.asarray(NUCLEUS_PROBS, jnp.float32))[None]
    filtered = np.asarray(filter_logits(logits, SamplingConfig(temperature=1.0, top_p=top_p)))[0]
    assert set(np.flatnonzero(np.isfinite(filtered)).tolist()) == kept


def test_filter_logits_top_k_then_top_p():
    # After top-k 2 the two survivors renormalise to 0.71 and 0.29, so top_p 0.9 keeps both.
    logits = jnp.log(jnp.asarray(NUCLEUS_PROBS, jnp.float32))[None]
    filtered = np.asarray(filter_logits(logits, SamplingConfig(temperature=1.0, top_k=2, top_p=0.9)))[0]
    assert set(np.flatnonzero(np.isfinite(filtered)).tolist()) == {1, 3}


def test_filter_logits_divides_by_temperature():
    logits = jax.random.normal(jax.random.PRNGKey(1), (2, 103))
    filtered = filter_logits(logits, SamplingConfig(temperature=0.5))
    np.testing.assert_allclose(np.asarray(filtered), np.asarray(logits) * 2.0, rtol=1e-6)


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.PRNGKey(2), (6, 103))
    keys = jax.random.split(jax.random.PRNGKey(3), 6)
    tokens = sample_tokens(logits, jax.random.key_data(keys), jnp.int32(4), SamplingConfig(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), axis=-1))


def test_top_k_one_is_argmax_for_every_key():
    logits = jax.random.normal(jax.random.PRNGKey(4), (6, 103))
    expected = np.argmax(np.asarray(logits), axis=-1)
    for step in range(5):
        keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(step), 6))
        tokens = sample_tokens(logits, keys, jnp.int32(step), SamplingConfig(temperature=1.0, top_k=1))
        np.testing.assert_array_equal(np.asarray(tokens), expected)


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(temperature=-0.1), "temperature=-0.1"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
    ],
)
def test_sampling_config_rejects_invalid(fields, named):
    with pytest.raises(ValueError, match=named):
        SamplingConfig(**fields)


@pytest.mark.parametrize(
    "num_rows, batch_size, multiple, expected",
    [(1, 16, 1, 1), (3, 16, 1, 4), (5, 16, 1, 8), (16, 16, 1, 16), (5, 4, 1, 4), (1, 8, 4, 4), (3, 12, 4, 4)],
)
def test_batch_bucket(num_rows, batch_size, multiple, expected):
    assert batch_bucket(num_rows, batch_size, multiple) == expected


# ---------------------------------------------------------------------------------------------
# The engine on a tiny random model (character tokenizer, EOS id 1).


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_models.tiny_loaded_model(tiny_models.tiny_config(num_key_value_heads=3), seed=21)


# Every sampling config compiles prefill and decode anew (it is a static argument), so the tiny
# tests share these two. 12 new tokens span three decode chunks of 5.
TINY_GREEDY = SamplingConfig(max_new_tokens=12)
TINY_SAMPLED = SamplingConfig(max_new_tokens=12, temperature=1.0)


@pytest.fixture(scope="module")
def tiny_generator(tiny_model):
    # chunk_size 5 does not divide the token budgets below, so chunk boundaries are exercised.
    return Generator(tiny_model, batch_size=4, max_cache_length=128, chunk_size=5, prompt_bucket=16)


def uncached_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding by re-running the full forward pass on each grown prompt, no KV cache.

    Rows are right-padded to one fixed length so every step reuses one compiled shape.
    """
    eos_ids = set(model.eos_token_ids)
    rows = [list(prompt) for prompt in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    width = max(len(prompt) for prompt in prompts) + max_new_tokens
    for _ in range(max_new_tokens):
        tokens, mask = tiny_models.right_padded([row + [0] * (width - len(row)) for row in rows])
        mask = np.asarray([[1] * len(row) + [0] * (width - len(row)) for row in rows], np.int32)
        logits = np.asarray(forward(model.graphdef, model.params, *tiny_models.as_jax(tokens, mask)))
        for index, row in enumerate(rows):
            if finished[index]:
                continue
            token = int(np.argmax(logits[index, len(row) - 1]))
            if token in eos_ids:
                finished[index] = True
                continue
            row.append(token)
            generated[index].append(token)
    return generated


def test_greedy_matches_uncached_argmax(tiny_model, tiny_generator):
    prompts = tiny_models.random_prompts([3, 13, 8], tiny_model.config.vocab_size, seed=22)
    completions = tiny_generator.generate(prompts, TINY_GREEDY, progress=False)
    expected = uncached_greedy(tiny_model, prompts, TINY_GREEDY.max_new_tokens)
    for index, (completion, reference_tokens) in enumerate(zip(completions, expected)):
        assert list(completion.token_ids) == reference_tokens, f"prompt {index}"


def test_sampling_same_seed_reproduces(tiny_model, tiny_generator):
    prompts = tiny_models.random_prompts([4, 9, 6], tiny_model.config.vocab_size, seed=23)
    first = tiny_generator.generate(prompts, TINY_SAMPLED, seed=7, progress=False)
    again = tiny_generator.generate(prompts, TINY_SAMPLED, seed=7, progress=False)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]


def test_sampling_different_seed_differs(tiny_model, tiny_generator):
    prompts = tiny_models.random_prompts([4, 9, 6], tiny_model.config.vocab_size, seed=23)
    first = tiny_generator.generate(prompts, TINY_SAMPLED, seed=7, progress=False)
    other = tiny_generator.generate(prompts, TINY_SAMPLED, seed=8, progress=False)
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_sampling_rows_get_different_keys(tiny_model, tiny_generator):
    prompt = tiny_models.random_prompts([6], tiny_model.config.vocab_size, seed=24)[0]
    completions = tiny_generator.generate([prompt] * 3, TINY_SAMPLED, seed=7, progress=False)
    assert len({c.token_ids for c in completions}) == 3


def test_sample_independent_of_batch(tiny_model, tiny_generator):
    prompts = tiny_models.random_prompts([5, 11, 2, 8], tiny_model.config.vocab_size, seed=25)
    batched = tiny_generator.generate(prompts, TINY_SAMPLED, seed=3, row_ids=[40, 41, 42, 43], progress=False)
    for index, prompt in enumerate(prompts):
        (alone,) = tiny_generator.generate([prompt], TINY_SAMPLED, seed=3, row_ids=[40 + index], progress=False)
        assert alone.token_ids == batched[index].token_ids, f"prompt {index}"


def test_row_ids_default_to_prompt_index(tiny_model, tiny_generator):
    prompts = tiny_models.random_prompts([5, 7], tiny_model.config.vocab_size, seed=26)
    default = tiny_generator.generate(prompts, TINY_SAMPLED, seed=3, progress=False)
    explicit = tiny_generator.generate(prompts, TINY_SAMPLED, seed=3, row_ids=[0, 1], progress=False)
    assert [c.token_ids for c in default] == [c.token_ids for c in explicit]


def test_stop_string_cuts_text(tiny_model, tiny_generator):
    prompt = tiny_models.random_prompts([6], tiny_model.config.vocab_size, seed=27)[0]
    (full,) = tiny_generator.generate([prompt], TINY_SAMPLED, seed=5, progress=False)
    assert len(full.text) >= 10, full.text  # the random model must produce text to cut
    stop = full.text[6:8]

    (stopped,) = tiny_generator.generate(
        [prompt], TINY_SAMPLED, seed=5, stop_strings=[stop], progress=False
    )

    assert stopped.finish_reason == FINISH_STOP
    assert stopped.text == full.text[: full.text.find(stop)]
    # Decoding ends at the end of the chunk in which the stop string appeared.
    assert len(stopped.token_ids) < len(full.token_ids)
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]


def test_absent_stop_string_changes_nothing(tiny_model, tiny_generator):
    prompt = tiny_models.random_prompts([6], tiny_model.config.vocab_size, seed=27)[0]
    (full,) = tiny_generator.generate([prompt], TINY_SAMPLED, seed=5, progress=False)
    (same,) = tiny_generator.generate(
        [prompt], TINY_SAMPLED, seed=5, stop_strings=["\x00never"], progress=False
    )
    assert same == full


def test_max_new_tokens_gives_length(tiny_model):
    # An EOS id outside the vocabulary can never be sampled, so every row runs to the budget.
    no_eos_model = dataclasses.replace(tiny_model, eos_token_ids=(tiny_model.config.vocab_size,))
    generator = Generator(no_eos_model, batch_size=4, max_cache_length=128, chunk_size=5, prompt_bucket=16)
    prompts = tiny_models.random_prompts([4, 10], tiny_model.config.vocab_size, seed=28)
    completions = generator.generate(prompts, TINY_SAMPLED, progress=False)
    for completion in completions:
        assert completion.finish_reason == FINISH_LENGTH
        assert len(completion.token_ids) == TINY_SAMPLED.max_new_tokens


def test_eos_gives_eos(tiny_model, tiny_generator):
    prompt = tiny_models.random_prompts([9], tiny_model.config.vocab_size, seed=29)[0]
    (greedy,) = tiny_generator.generate([prompt], TINY_GREEDY, progress=False)
    third = greedy.token_ids[2]
    assert third not in greedy.token_ids[:2], greedy.token_ids  # the third token must be new

    # Declare the third greedy token the end of sequence: the row must stop right before it.
    eos_model = dataclasses.replace(tiny_model, eos_token_ids=(third,))
    eos_generator = Generator(eos_model, batch_size=4, max_cache_length=128, chunk_size=5, prompt_bucket=16)
    (completion,) = eos_generator.generate([prompt], TINY_GREEDY, progress=False)

    assert completion.finish_reason == FINISH_EOS
    assert completion.token_ids == greedy.token_ids[:2]


def test_results_keep_caller_order(tiny_model, tiny_generator):
    # The engine sorts prompts by length internally; results must come back in input order.
    prompts = tiny_models.random_prompts([12, 2, 7, 4, 9], tiny_model.config.vocab_size, seed=30)
    completions = tiny_generator.generate(prompts, TINY_GREEDY, progress=False)
    assert [c.num_prompt_tokens for c in completions] == [12, 2, 7, 4, 9]


def test_prompt_too_long_names_prompt(tiny_model):
    generator = Generator(tiny_model, batch_size=4, max_cache_length=64, chunk_size=8, prompt_bucket=16)
    prompts = [[5] * 10, [5] * 50]
    with pytest.raises(PromptTooLongError, match="prompt 1 has 50 tokens"):
        generator.generate(prompts, SamplingConfig(max_new_tokens=8), progress=False)


def test_empty_prompt_rejected(tiny_generator):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny_generator.generate([[5, 6], []], SamplingConfig(max_new_tokens=2), progress=False)


def test_cache_longer_than_model_rejected(tiny_model):
    with pytest.raises(ValueError, match="max_cache_length=512"):
        Generator(tiny_model, max_cache_length=512)


def test_compiled_shapes_stay_bounded(tiny_model):
    generator = Generator(tiny_model, batch_size=2, max_cache_length=128, chunk_size=4, prompt_bucket=16)
    sampling = SamplingConfig(max_new_tokens=2)
    # `_cache_size` counts real XLA compilations, not only the shapes the generator logged.
    prefill_before = generation.prefill._cache_size()
    decode_before = generation.decode_chunk._cache_size()

    # 10 calls with 1-5 prompts of 1-30 tokens: many raw shapes, few buckets.
    rng = np.random.default_rng(31)
    raw_shapes = set()
    for call in range(10):
        lengths = rng.integers(1, 31, size=int(rng.integers(1, 6))).tolist()
        raw_shapes.add((len(lengths), max(lengths)))
        prompts = tiny_models.random_prompts(lengths, tiny_model.config.vocab_size, seed=call)
        generator.generate(prompts, sampling, progress=False)

    # Batch buckets {1, 2} x prompt buckets {16, 32}, once for prefill and once for decode.
    assert len(raw_shapes) > 4
    assert generator.num_compiled_shapes <= 2 * 2 * 2
    assert generation.prefill._cache_size() - prefill_before <= 2 * 2
    assert generation.decode_chunk._cache_size() - decode_before <= 2 * 2
