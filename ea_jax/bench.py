"""Throughput of generation and SFT on the packaged model, next to transformers + torch.

    python -m ea_jax.bench [--output=docs/benchmarks.md] [--repeats=3]

Both stacks run in the same process on the same weights (the dequantised SmolLM2-135M-Instruct
GGUF, float32), one after the other, so machine noise hits them alike:
- generation: a batch of 16 chat prompts, greedy, exactly 128 new tokens per row;
- SFT: one AdamW step on a batch of 8 x 256 tokens (forward, backward, update).
The best of `repeats` timed runs is reported, after one untimed warm-up run (compilation).
torch is only a test dependency; without it the reference columns are left out.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import time
from pathlib import Path

from absl import app, flags

logger = logging.getLogger("ea_jax.bench")

_OUTPUT = flags.DEFINE_string("output", "docs/benchmarks.md", "Markdown file the results are written to.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement; the best is reported.")

GENERATION_BATCH = 16
NEW_TOKENS = 128
SFT_BATCH = 8
SFT_LENGTH = 256
PROMPTS = (
    "Explain how a refrigerator keeps food cold.",
    "Write a short poem about autumn leaves.",
    "What are three ways to save money on groceries?",
    "Summarise the plot of a detective story in two sentences.",
)


def _best_time(function, repeats: int) -> float:
    function()  # warm-up: compilation and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_ours(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ea_jax.chat import encode_chat, user_turn
    from ea_jax.generation import Generator, SamplingConfig
    from ea_jax.loading import load_model
    from ea_jax.sft import SFTConfig, init_train_state, make_optimizer, make_train_step

    model = load_model()
    # An EOS id no token has, so every row generates exactly NEW_TOKENS tokens.
    never_stopping = dataclasses.replace(model, eos_token_ids=(-1,))
    generator = Generator(never_stopping, batch_size=GENERATION_BATCH)
    prompts = [encode_chat(model.tokenizer, user_turn(PROMPTS[i % len(PROMPTS)])) for i in range(GENERATION_BATCH)]
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    generation_time = _best_time(lambda: generator.generate(prompts, sampling, progress=False), repeats)

    config = SFTConfig(num_steps=1000, warmup_steps=1, batch_size=SFT_BATCH)
    optimizer = make_optimizer(config)
    step = make_train_step(model.graphdef, optimizer, grad_accum_steps=1)
    params, opt_state = init_train_state(optimizer, model.params, model.mesh)
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(0, model.config.vocab_size, (1, SFT_BATCH, SFT_LENGTH)), jnp.int32),
        "input_mask": jnp.ones((1, SFT_BATCH, SFT_LENGTH), jnp.int32),
        "loss_mask": jnp.ones((1, SFT_BATCH, SFT_LENGTH), jnp.int32),
    }
    state = {"params": params, "opt_state": opt_state}

    def sft_step():
        state["params"], state["opt_state"], metrics = step(state["params"], state["opt_state"], batch)
        jax.block_until_ready(metrics["loss"])

    sft_time = _best_time(sft_step, repeats)
    return {
        "generation_tokens_per_second": GENERATION_BATCH * NEW_TOKENS / generation_time,
        "sft_tokens_per_second": SFT_BATCH * SFT_LENGTH / sft_time,
    }


def bench_transformers(repeats: int) -> dict | None:
    try:
        import torch
        import transformers
    except ImportError:
        logger.warning("torch is not installed; skipping the transformers reference (pip install -e '.[test]')")
        return None
    from ea_jax.chat import user_turn
    from ea_jax.loading import find_default_gguf, gguf_tokenizer, read_gguf

    config, state, _ = read_gguf(find_default_gguf())
    tokenizer = gguf_tokenizer(find_default_gguf())
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config())).eval()
    model.load_state_dict({name: torch.from_numpy(value) for name, value in state.items()}, strict=False)
    model.tie_weights()

    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(user_turn(PROMPTS[i % len(PROMPTS)]), tokenize=False, add_generation_prompt=True)
             for i in range(GENERATION_BATCH)]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def generate():
        with torch.no_grad():
            model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           pad_token_id=tokenizer.pad_token_id)

    generation_time = _best_time(generate, repeats)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    input_ids = torch.randint(0, config.vocab_size, (SFT_BATCH, SFT_LENGTH))

    def sft_step():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    sft_time = _best_time(sft_step, repeats)
    return {
        "generation_tokens_per_second": GENERATION_BATCH * NEW_TOKENS / generation_time,
        "sft_tokens_per_second": SFT_BATCH * SFT_LENGTH / sft_time,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def render(ours: dict, reference: dict | None, repeats: int) -> str:
    import jax

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"
    rows = [
        ("generation, batch 16, 128 new tokens (tokens/s)", "generation_tokens_per_second"),
        ("SFT AdamW step, 8 x 256 tokens (tokens/s)", "sft_tokens_per_second"),
    ]
    lines = [
        "# Benchmarks",
        "",
        f"Command: `python -m ea_jax.bench --repeats={repeats}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine}; jax {jax.__version__} on {jax.devices()[0].platform}"
        + (f"; torch {reference['torch_version']} ({reference['torch_threads']} threads), "
           f"transformers {reference['transformers_version']}" if reference else ""),
        "",
        "Model: SmolLM2-135M-Instruct from the packaged Q4_1 GGUF, dequantised to float32 for both stacks. "
        f"Best of {repeats} timed runs after one warm-up run; both stacks measured in the same process.",
        "",
        "| measurement | ea_jax | transformers + torch | ratio |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        theirs = reference[key] if reference else None
        ratio = f"{ours[key] / theirs:.2f}x" if theirs else "n/a"
        lines.append(f"| {label} | {ours[key]:.0f} | {'n/a' if theirs is None else f'{theirs:.0f}'} | {ratio} |")
    lines.append("")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    repeats = _REPEATS.value
    ours = bench_ours(repeats)
    logger.info("ea_jax: %s", ours)
    reference = bench_transformers(repeats)
    logger.info("transformers: %s", reference)

    from ea_jax import io

    text = render(ours, reference, repeats)
    io.atomic_write_text(Path(_OUTPUT.value), text)
    print(text)
    print(f"Written to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
