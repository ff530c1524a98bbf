"""One batched generation engine: jitted prefill, jitted decode chunks, a KV cache.

How a batch is laid out:
- Prompts are left-padded to a bucketed length T, so every row writes its next token into the
  same cache slot; positions count real tokens only (see `ea_jax.model`).
- The cache has S = T + max_new_tokens (rounded up to whole decode chunks) slots.
- Decoding runs in chunks of `chunk_size` steps inside one `lax.while_loop`. Between chunks
  the host decodes the new text and marks rows that produced a stop string as done, so stop
  strings end a row within one chunk and EOS ends it at once.
- Each row has its own PRNG key, folded with the step index, so a row's sample does not
  depend on which other prompts share its batch.

Shapes are bucketed (batch to a power of two up to `batch_size`, prompt length to a multiple
of `prompt_bucket`), so a run compiles a bounded number of times; every new shape is logged.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct
from tqdm.auto import tqdm

from ea_jax import io, sharding
from ea_jax.chat import Message, encode_chat
from ea_jax.loading import LoadedModel
from ea_jax.model import QUERY_CHUNK, KVCache, positions_from_mask

logger = logging.getLogger(__name__)

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"

# Shapes already compiled in this process. jax.jit caches across Generator instances, so the
# compile log is process-wide too.
_SEEN_SHAPES: set[tuple] = set()


class GenerationConfigError(ValueError):
    """Generator settings that do not fit the model or the mesh."""


class PromptTooLongError(ValueError):
    """A prompt that, with the requested new tokens, does not fit the KV cache."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables top-k)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 disables top-p)")


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens reached)
    num_prompt_tokens: int


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries; one pytree so a chunk is one jitted call."""

    kv_cache: KVCache
    last_token: jax.Array  # [B] token to feed next
    positions: jax.Array  # [B] position of last_token
    cache_index: jax.Array  # [] slot where last_token's key/value is written
    step: jax.Array  # [] number of tokens generated so far
    tokens: jax.Array  # [B, max_new_tokens] generated tokens, pad after a row is done
    done: jax.Array  # [B]
    row_keys: jax.Array  # [B, 2] one PRNG key per row


# ---------------------------------------------------------------------------------------------
# Pure sampling.


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Scale by temperature and mask out tokens outside top-k and the top-p nucleus. [..., V]"""
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth_largest = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token when the mass before it is below top_p, so the most likely token is always kept.
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        kept = jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_tokens(logits: jax.Array, row_keys: jax.Array, step: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Pick one token per row from logits [B, V]; a fresh key per row and step."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, sampling)
    step_keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(row_keys)
    return jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Jitted steps.


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length", "sampling", "eos_ids"))
def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_tokens: jax.Array,  # [B, T] left-padded
    prompt_mask: jax.Array,  # [B, T]
    row_keys: jax.Array,  # [B, 2]
    *,
    cache_length: int,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
) -> DecodeState:
    """Run the prompt through the model, fill the cache and sample the first new token."""
    model = nnx.merge(graphdef, params)
    batch, length = prompt_tokens.shape
    config = model.config

    cache = KVCache.init(config, batch, cache_length)
    cache = cache.replace(mask=cache.mask.at[:, :length].set(prompt_mask.astype(bool)))
    positions = positions_from_mask(prompt_mask)
    # Query t sees cache slot s when s <= t and s holds a real token; slots >= T are empty.
    causal = jnp.arange(cache_length)[None, :] <= jnp.arange(length)[:, None]  # [T, S]
    attention_mask = causal[None] & cache.mask[:, None, :]  # [B, T, S]

    logits, cache = model(prompt_tokens, positions, attention_mask, cache, jnp.int32(0), query_chunk=QUERY_CHUNK)
    first = sample_tokens(logits[:, -1], row_keys, jnp.int32(0), sampling)

    tokens = jnp.zeros((batch, sampling.max_new_tokens), jnp.int32).at[:, 0].set(first)
    return DecodeState(
        kv_cache=cache,
        last_token=first,
        positions=positions[:, -1] + 1,
        cache_index=jnp.int32(length),
        step=jnp.int32(1),
        tokens=tokens,
        done=jnp.isin(first, jnp.asarray(eos_ids)),
        row_keys=row_keys,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps", "sampling", "eos_ids", "pad_id"), donate_argnames=("state",))
def decode_chunk(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    state: DecodeState,
    *,
    num_steps: int,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> DecodeState:
    """Generate up to `num_steps` tokens per row, stopping early when every row is done."""
    model = nnx.merge(graphdef, params)
    last_step = jnp.minimum(state.step + num_steps, sampling.max_new_tokens)

    def should_continue(state: DecodeState):
        return (state.step < last_step) & ~jnp.all(state.done)

    def body(state: DecodeState) -> DecodeState:
        slot = state.cache_index
        cache_mask = state.kv_cache.mask.at[:, slot].set(True)
        cache = state.kv_cache.replace(mask=cache_mask)
        attention_mask = cache_mask[:, None, :]  # [B, 1, S]: every filled slot is in the past

        logits, cache = model(state.last_token[:, None], state.positions[:, None], attention_mask, cache, slot)
        token = sample_tokens(logits[:, 0], state.row_keys, state.step, sampling)
        token = jnp.where(state.done, pad_id, token)

        return state.replace(
            kv_cache=cache,
            last_token=token,
            positions=state.positions + 1,
            cache_index=slot + 1,
            step=state.step + 1,
            tokens=state.tokens.at[:, state.step].set(token),
            done=state.done | jnp.isin(token, jnp.asarray(eos_ids)),
        )

    return jax.lax.while_loop(should_continue, body, state)


# ---------------------------------------------------------------------------------------------
# Host-side engine.


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def batch_bucket(num_rows: int, batch_size: int, multiple: int) -> int:
    """Smallest power of two >= num_rows (capped at batch_size), rounded up to `multiple`."""
    bucket = min(batch_size, 1 << max(0, math.ceil(math.log2(max(num_rows, 1)))))
    return _round_up(bucket, multiple)


class Generator:
    """Batched generation for one loaded model; serves CAI data generation and evaluation."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        batch_size: int = 16,
        max_cache_length: int | None = None,
        chunk_size: int = 32,
        prompt_bucket: int = 128,
    ):
        self.model = model
        multiple = sharding.batch_multiple(model.mesh)
        if batch_size % multiple:
            raise GenerationConfigError(
                f"batch_size={batch_size} is not a multiple of the mesh's data x fsdp size {multiple}; "
                f"use a multiple of {multiple}"
            )
        self.batch_size = batch_size
        self.max_cache_length = max_cache_length or model.config.max_position_embeddings
        if self.max_cache_length > model.config.max_position_embeddings:
            raise GenerationConfigError(
                f"max_cache_length={self.max_cache_length} exceeds the model's max_position_embeddings="
                f"{model.config.max_position_embeddings}; lower it"
            )
        self.chunk_size = chunk_size
        self.prompt_bucket = prompt_bucket
        self.pad_id = int(model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.eos_token_ids[0])
        self._compiled_shapes: set[tuple] = set()

    def _log_compile(self, kind: str, **shape) -> None:
        """Log the first use of each shape: jit compiles once per shape and model config."""
        key = (kind, self.model.config, *sorted(shape.items()))
        self._compiled_shapes.add(key)
        if key not in _SEEN_SHAPES:
            _SEEN_SHAPES.add(key)
            logger.info("compiling %s for %s", kind, ", ".join(f"{k}={v}" for k, v in shape.items()))

    @property
    def num_compiled_shapes(self) -> int:
        """Distinct (kind, shape) pairs this generator has run; each costs one compilation at most."""
        return len(self._compiled_shapes)

    def check_lengths(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Raise PromptTooLongError for the first prompt that cannot fit the cache."""
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {index} is empty; every prompt needs at least one token")
            needed = _round_up(len(prompt), self.prompt_bucket) + _round_up(max_new_tokens, self.chunk_size)
            if needed > self.max_cache_length:
                raise PromptTooLongError(
                    f"prompt {index} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it needs "
                    f"a cache of {needed} slots (after bucketing) but max_cache_length is {self.max_cache_length}. "
                    "Shorten the prompt, lower max_new_tokens or raise max_cache_length (model.max_cache_length "
                    f"in a run config; at most max_position_embeddings={self.model.config.max_position_embeddings})"
                )

    def generate_chat(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: SamplingConfig,
        *,
        seed: int = 0,
        stop_strings: Sequence[str] = (),
        desc: str = "generating",
        progress: bool = True,
    ) -> list[Completion]:
        """Render each conversation with the tokenizer's chat template and generate a reply."""
        prompts = [encode_chat(self.model.tokenizer, messages) for messages in conversations]
        return self.generate(prompts, sampling, seed=seed, stop_strings=stop_strings, desc=desc, progress=progress)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        *,
        seed: int = 0,
        stop_strings: Sequence[str] = (),
        desc: str = "generating",
        progress: bool = True,
        row_ids: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Generate a completion for each token-id prompt, in the order given.

        `row_ids` seed each row's PRNG key (default: the prompt's index), so a resumed run that
        generates a subset reproduces the same samples.
        """
        self.check_lengths(prompts, sampling.max_new_tokens)
        row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        # Sorting by length keeps padding small; results are put back in the caller's order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        base_key = jax.random.key_data(jax.random.PRNGKey(seed))

        with tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt") as bar:
            for start in range(0, len(order), self.batch_size):
                indices = order[start : start + self.batch_size]
                batch = [list(prompts[i]) for i in indices]
                keys = [np.asarray(jax.random.fold_in(base_key, row_ids[i])) for i in indices]
                for index, completion in zip(indices, self._generate_batch(batch, keys, sampling, stop_strings)):
                    results[index] = completion
                bar.update(len(indices))
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts, keys, sampling: SamplingConfig, stop_strings) -> list[Completion]:
        model = self.model
        num_rows = len(prompts)
        batch = batch_bucket(num_rows, self.batch_size, sharding.batch_multiple(model.mesh))
        length = _round_up(max(len(p) for p in prompts), self.prompt_bucket)
        cache_length = length + _round_up(sampling.max_new_tokens, self.chunk_size)

        tokens = np.full((batch, length), self.pad_id, np.int32)
        mask = np.zeros((batch, length), np.int32)
        row_keys = np.zeros((batch, 2), np.uint32)
        for row, prompt in enumerate(prompts):
            tokens[row, length - len(prompt) :] = prompt
            mask[row, length - len(prompt) :] = 1
            row_keys[row] = keys[row]
        # Padding rows get one real token so that their attention is well defined.
        mask[num_rows:, -1] = 1

        eos_ids = tuple(model.eos_token_ids)
        self._log_compile("prefill", batch=batch, prompt_length=length, cache_length=cache_length)
        with jax.set_mesh(model.mesh):
            place = lambda x: jax.device_put(x, sharding.batch_sharding(model.mesh, x.ndim))
            state = prefill(
                model.graphdef, model.params, place(tokens), place(mask), place(row_keys),
                cache_length=cache_length, sampling=sampling, eos_ids=eos_ids,
            )
            stopped_by_string = np.zeros(batch, bool)
            stopped_by_string[num_rows:] = True  # padding rows count as done from the start
            state = state.replace(done=state.done | jnp.asarray(stopped_by_string))
            self._log_compile("decode", batch=batch, cache_length=cache_length, chunk=self.chunk_size)
            while True:
                done = np.asarray(state.done)
                if done.all() or int(state.step) >= sampling.max_new_tokens:
                    break
                state = decode_chunk(
                    model.graphdef, model.params, state,
                    num_steps=self.chunk_size, sampling=sampling, eos_ids=eos_ids, pad_id=self.pad_id,
                )
                if stop_strings:
                    generated = np.asarray(state.tokens)
                    newly = np.zeros(batch, bool)
                    for row in range(num_rows):
                        if not done[row] and not stopped_by_string[row]:
                            text = model.tokenizer.decode(generated[row, : int(state.step)], skip_special_tokens=True)
                            newly[row] = any(stop in text for stop in stop_strings)
                    if newly.any():
                        stopped_by_string |= newly
                        state = state.replace(done=state.done | jnp.asarray(newly))

        generated = np.asarray(state.tokens)
        num_steps = int(state.step)
        return [
            self._finish(generated[row, :num_steps], eos_ids, stop_strings, len(prompts[row]))
            for row in range(num_rows)
        ]

    def _finish(self, row_tokens: np.ndarray, eos_ids, stop_strings, num_prompt_tokens: int) -> Completion:
        row_tokens = [int(t) for t in row_tokens]
        eos_at = next((i for i, t in enumerate(row_tokens) if t in eos_ids), None)
        if eos_at is not None:
            row_tokens = row_tokens[:eos_at]
        text = self.model.tokenizer.decode(row_tokens, skip_special_tokens=True)

        stop_at = min((text.find(s) for s in stop_strings if s in text), default=-1)
        if stop_at >= 0:
            return Completion(text[:stop_at], tuple(row_tokens), FINISH_STOP, num_prompt_tokens)
        if eos_at is not None:
            return Completion(text, tuple(row_tokens), FINISH_EOS, num_prompt_tokens)
        return Completion(text, tuple(row_tokens), FINISH_LENGTH, num_prompt_tokens)


def stable_row_id(record_id: str) -> int:
    """Derive a PRNG row id from a record id, so a record's samples do not depend on its neighbours."""
    return int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def generate_journalled(
    generator: Generator,
    journal: Path,
    jobs: list[tuple[str, int, list[Message]]],  # (record id, stable row id, conversation)
    sampling: SamplingConfig,
    seed: int,
    chunk: int,
    desc: str,
) -> dict[str, dict]:
    """Generate the jobs missing from `journal`, appending each finished chunk of `chunk` jobs.

    A rerun after a crash reads the journal and generates only what is missing; `row` ids seed
    the per-row PRNG keys, so regenerated rows get the same samples as an uninterrupted run.
    """
    done = io.read_journal(journal)
    pending = [job for job in jobs if job[0] not in done]
    if done:
        logger.info("%s: %d of %d already in %s", desc, len(jobs) - len(pending), len(jobs), journal.name)
    for start in range(0, len(pending), chunk):
        part = pending[start : start + chunk]
        prompts = [encode_chat(generator.model.tokenizer, conversation) for _, _, conversation in part]
        completions = generator.generate(
            prompts, sampling, seed=seed, row_ids=[row for _, row, _ in part],
            desc=f"{desc} {start + len(part)}/{len(pending)}",
        )
        entries = [
            {"id": record_id, "text": completion.text, "finish_reason": completion.finish_reason,
             "num_tokens": len(completion.token_ids)}
            for (record_id, _, _), completion in zip(part, completions)
        ]
        io.append_jsonl(journal, entries)
        done.update({entry["id"]: entry for entry in entries})
    return done
