"""Base configuration shared by every constitution x scope run.

A run config imports `get_config` from here and changes only the constitution and the scope.
Override any field on the command line: `--config.sft.num_steps=20`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.run_name = ""  # folder name under output_dir; empty means "<constitution>_<scope>"
    config.output_dir = "runs"  # each run writes into output_dir/run_name
    config.seed = 0  # seeds principle draws, sampling, shuffling and bootstraps

    config.constitution = "consequentialism"  # a name in constitutions/ or a path to a .json file
    config.scope = "narrow"  # "broad": every training subcategory; "narrow": narrow_subcategories only
    config.narrow_subcategories = ("harassment", "illegal_behaviour")
    config.filtered_out = ("stalking", "fraud")  # held out of training, evaluated as unseen

    config.model = ml_collections.ConfigDict()
    config.model.source = "default"  # "default" (packaged SmolLM2-135M-Instruct), a .gguf file or a HF folder
    config.model.max_cache_length = 2048  # KV-cache slots per row: prompt plus new tokens

    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices

    config.data = ml_collections.ConfigDict()
    config.data.taxonomy = ""  # taxonomy JSON; "" uses the shipped ea_jax/data/taxonomy.json
    config.data.train_prompts = ""  # red-team training pool (JSONL); "" uses the shipped file
    config.data.eval_prompts = ""  # red-team evaluation set (JSONL); "" uses the shipped file
    config.data.benign_prompts = ""  # benign over-refusal set (JSONL); "" uses the shipped file
    config.data.max_train_prompts = 0  # cap on in-scope training prompts; 0 keeps all
    config.data.max_eval_prompts_per_subcategory = 0  # 0 keeps all
    config.data.max_benign_prompts = 0  # 0 keeps all
    config.data.max_persona_statements_per_dimension = 0  # 0 keeps all

    config.generation = ml_collections.ConfigDict()
    config.generation.batch_size = 16  # rows per generation batch (a multiple of data x fsdp)
    config.generation.chunk_size = 32  # decode steps between host checks for stop strings

    config.cai = ml_collections.ConfigDict()
    config.cai.rounds = 1  # critique/revision rounds per prompt
    config.cai.temperature = 0.7  # sampling temperature for initial responses, critiques and revisions
    config.cai.top_p = 0.9
    config.cai.answer_max_new_tokens = 160
    config.cai.critique_max_new_tokens = 128
    config.cai.revision_max_new_tokens = 192
    config.cai.min_revision_words = 3  # shorter revisions are filtered out
    config.cai.trim_truncated = True  # cut a revision that hit revision_max_new_tokens back to its last full sentence
    config.cai.keep_truncated = False  # keep untrimmable cut-off revisions as they are (smoke tests only)

    config.sft = ml_collections.ConfigDict()
    config.sft.num_epochs = 3  # sets num_steps when num_steps is 0
    config.sft.num_steps = 0  # optimizer steps; 0 derives it from num_epochs
    config.sft.batch_size = 4  # examples per micro-batch
    config.sft.grad_accum_steps = 2  # micro-batches per optimizer step
    config.sft.learning_rate = 2e-5
    config.sft.warmup_steps = 2
    config.sft.weight_decay = 0.01
    config.sft.max_grad_norm = 1.0
    config.sft.max_length = 512  # tokens per example; longer examples are an error, never truncated
    config.sft.checkpoint_every = 10  # optimizer steps between Orbax checkpoints
    config.sft.log_every = 1

    config.eval = ml_collections.ConfigDict()
    config.eval.max_new_tokens = 128  # greedy response length for safety evaluation
    config.eval.bootstrap_resamples = 2000
    config.eval.persona_batch_size = 16

    return config
