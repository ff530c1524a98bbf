"""The end-to-end job for one constitution and one scope.

    python -m ea_jax.main --config=configs/consequentialist_narrow.py [--config.sft.num_steps=20]

Stages, each writing into one run folder:
  1. load the source model and select the prompts in scope (data/scope.json);
  2. generate Constitutional-AI data: answers, critiques, revisions (cai/);
  3. finetune the source model on the kept revisions (sft/, model/);
  4. evaluate the source and the finetuned model: safety and persona (eval/source, eval/finetuned);
  5. write metrics.json, report.md and plots/.

Every stage records a hash of the inputs it depends on in its `stage.json`. A stage whose output
is complete and whose hash matches is skipped, so rerunning after a crash continues. A stage
whose inputs changed is moved aside (`<stage>.stale-<hash>`) rather than overwritten.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from ea_jax import cai, evaluation, io, persona, plan, prompts, report, sharding
from ea_jax.constitutions import ConstitutionError, load_constitution
from ea_jax.generation import Generator, PromptTooLongError, SamplingConfig
from ea_jax.judges import RefusalJudge
from ea_jax.loading import LoadedModel, ModelLoadError, load_model

logger = logging.getLogger("ea_jax.main")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration file, e.g. configs/consequentialist_narrow.py.")

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "tokenizers",
            "datasets", "ml-collections", "numpy", "gguf", "safetensors", "tensorflow-cpu")


class ConfigError(ValueError):
    """A configuration value that cannot be used."""


# ---------------------------------------------------------------------------------------------
# Configuration.


def validate_config(config: ConfigDict) -> None:
    """Check the fields that code far from here would otherwise reject late or silently."""
    problems = []
    if config.scope not in prompts.SCOPES:
        problems.append(f"scope={config.scope!r} is not one of {prompts.SCOPES}")
    positive_ints = {
        "cai.rounds": config.cai.rounds, "generation.batch_size": config.generation.batch_size,
        "sft.batch_size": config.sft.batch_size, "sft.grad_accum_steps": config.sft.grad_accum_steps,
        "eval.max_new_tokens": config.eval.max_new_tokens, "cai.answer_max_new_tokens": config.cai.answer_max_new_tokens,
        "cai.critique_max_new_tokens": config.cai.critique_max_new_tokens,
        "cai.revision_max_new_tokens": config.cai.revision_max_new_tokens, "sft.max_length": config.sft.max_length,
        "eval.bootstrap_resamples": config.eval.bootstrap_resamples,
        "eval.persona_batch_size": config.eval.persona_batch_size,
        "generation.chunk_size": config.generation.chunk_size,
        "sft.checkpoint_every": config.sft.checkpoint_every, "sft.log_every": config.sft.log_every,
    }
    for name, value in positive_ints.items():
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name}={value!r} must be a positive integer")
    non_negative = {
        "data.max_train_prompts": config.data.max_train_prompts,
        "data.max_eval_prompts_per_subcategory": config.data.max_eval_prompts_per_subcategory,
        "data.max_benign_prompts": config.data.max_benign_prompts,
        "data.max_persona_statements_per_dimension": config.data.max_persona_statements_per_dimension,
        "sft.num_steps": config.sft.num_steps, "sft.num_epochs": config.sft.num_epochs,
    }
    for name, value in non_negative.items():
        if not isinstance(value, int) or value < 0:
            problems.append(f"{name}={value!r} must be an integer >= 0 (0 means 'all' or 'derive')")
    if config.sft.num_steps == 0 and config.sft.num_epochs == 0:
        problems.append("sft.num_steps and sft.num_epochs are both 0; set one of them")
    if config.sft.learning_rate <= 0:
        problems.append(f"sft.learning_rate={config.sft.learning_rate} must be > 0")
    if not 0.0 <= config.cai.temperature:
        problems.append(f"cai.temperature={config.cai.temperature} must be >= 0")
    if not 0.0 < config.cai.top_p <= 1.0:
        problems.append(f"cai.top_p={config.cai.top_p} must be in (0, 1]")
    if not isinstance(config.seed, int) or config.seed < 0:
        problems.append(f"seed={config.seed!r} must be an integer >= 0")
    shape = tuple(config.mesh.shape) if isinstance(config.mesh.shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or not all(isinstance(size, int) for size in shape):
        problems.append(f"mesh.shape={config.mesh.shape!r} must be three integers (data, fsdp, tensor), e.g. '(1,-1,1)'")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def run_name(config: ConfigDict) -> str:
    return config.run_name or f"{Path(config.constitution).stem}_{config.scope}"


def environment_info() -> dict:
    import jax

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        dirty = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": commit,
        "git_dirty": dirty,
        "devices": [str(device) for device in jax.devices()],
    }


# ---------------------------------------------------------------------------------------------
# Stage bookkeeping.


@dataclasses.dataclass
class Stage:
    """One stage's folder and the hash of everything its output depends on."""

    folder: Path
    key: dict

    @property
    def hash(self) -> str:
        return io.config_hash(self.key)

    def is_complete(self) -> bool:
        marker = self.folder / "stage.json"
        if not marker.is_file():
            return False
        saved = json.loads(marker.read_text())
        return saved.get("hash") == self.hash and saved.get("complete") is True

    def begin(self) -> None:
        """Start or resume the stage: partial output made with the same inputs is kept."""
        marker = self.folder / "stage.json"
        if marker.is_file():
            saved = json.loads(marker.read_text())
            if saved.get("hash") == self.hash:
                logger.info("resuming %s", self.folder)
                return
            stale = self.folder.with_name(f"{self.folder.name}.stale-{saved.get('hash')}")
            logger.warning("%s was made with other inputs; moving it to %s", self.folder, stale.name)
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(self.folder, stale)
        elif self.folder.exists() and any(self.folder.iterdir()):
            # A folder without stage.json predates stage tracking or was made by hand: keep it.
            stale = self.folder.with_name(f"{self.folder.name}.stale-untracked-{int(time.time())}")
            os.replace(self.folder, stale)
        self.folder.mkdir(parents=True, exist_ok=True)
        io.atomic_write_json(self.folder / "stage.json", {"hash": self.hash, "complete": False, "key": self.key})

    def finish(self) -> None:
        io.atomic_write_json(self.folder / "stage.json", {"hash": self.hash, "complete": True, "key": self.key})


# ---------------------------------------------------------------------------------------------
# Stages.


def load_prompt_sets(config: ConfigDict) -> prompts.PromptSets:
    """Load the shipped prompt sets, or the files named in config.data, and check them for leaks."""
    paths = {"taxonomy": config.data.taxonomy, "train_prompts": config.data.train_prompts,
             "eval_prompts": config.data.eval_prompts, "benign_prompts": config.data.benign_prompts}
    for field, path in paths.items():
        if path and not Path(path).is_file():
            raise ConfigError(f"data.{field}={path!r} not found; give an existing JSONL/JSON file or '' for the shipped one")
    taxonomy = prompts.load_taxonomy(config.data.taxonomy or None)
    shipped = prompts.load_default_sets(taxonomy)
    train = prompts.load_prompts(config.data.train_prompts, taxonomy) if config.data.train_prompts else shipped.train
    eval_ = prompts.load_prompts(config.data.eval_prompts, taxonomy) if config.data.eval_prompts else shipped.eval
    benign = (prompts.load_prompts(config.data.benign_prompts, taxonomy, require_subcategory=False)
              if config.data.benign_prompts else shipped.benign)

    # An evaluation prompt that (nearly) repeats a training prompt would measure memorisation.
    leaks = prompts.find_near_duplicates(eval_, train)
    if leaks:
        shown = ", ".join(f"{a} ~ {b} ({similarity:.2f})" for a, b, similarity in leaks[:5])
        raise prompts.PromptFileError(
            f"{len(leaks)} evaluation prompt(s) duplicate or nearly duplicate training prompts: {shown}; "
            "remove them from one of the two files"
        )
    return prompts.PromptSets(train=train, eval=eval_, benign=benign, taxonomy=taxonomy)


def take_balanced(records: list, limit: int, key) -> list:
    """Take up to `limit` records round-robin over groups (key(record)), keeping file order within each.

    A cap then samples every subcategory or category instead of the first ones in the file.
    """
    if not limit or limit >= len(records):
        return list(records)
    groups: dict[str, list] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    chosen = []
    for index in range(max(len(group) for group in groups.values())):
        for group in groups.values():
            if index < len(group) and len(chosen) < limit:
                chosen.append(group[index])
    order = {id(record): position for position, record in enumerate(records)}
    return sorted(chosen, key=lambda record: order[id(record)])


def select_prompts(config: ConfigDict, run_dir: Path):
    sets = load_prompt_sets(config)
    selection = prompts.select_scope(
        sets.train, config.scope, sets.taxonomy,
        narrow_subcategories=tuple(config.narrow_subcategories), filtered_out=tuple(config.filtered_out),
    )
    train = take_balanced(list(selection.kept), config.data.max_train_prompts, lambda r: r.subcategory)

    eval_prompts = []
    per_subcategory: dict[str, int] = {}
    for record in sets.eval:
        count = per_subcategory.get(record.subcategory, 0)
        if config.data.max_eval_prompts_per_subcategory and count >= config.data.max_eval_prompts_per_subcategory:
            continue
        per_subcategory[record.subcategory] = count + 1
        eval_prompts.append(record)
    benign = take_balanced(list(sets.benign), config.data.max_benign_prompts, lambda r: r.category)

    io.atomic_write_json(run_dir / "data" / "scope.json", {
        **selection.to_manifest(),
        "train_prompt_ids_used": [r.id for r in train],
        "eval_prompt_ids": [r.id for r in eval_prompts],
        "benign_prompt_ids": [r.id for r in benign],
    })
    logger.info("scope %s: %d training prompts kept (%d used), %d dropped; %d eval and %d benign prompts",
                config.scope, len(selection.kept), len(train), len(selection.dropped), len(eval_prompts), len(benign))
    trained = sorted({record.subcategory for record in selection.kept})
    return sets.taxonomy, trained, train, eval_prompts, benign


def select_statements(config: ConfigDict) -> list[persona.PersonaStatement]:
    statements = persona.load_statements()
    limit = config.data.max_persona_statements_per_dimension
    if not limit:
        return statements
    chosen, counts = [], {}
    # Take keyed and reverse-keyed statements alternately so a cap keeps the balance.
    for keyed in (1, -1):
        for statement in statements:
            key = (statement.dimension, keyed)
            if statement.keyed == keyed and counts.get(key, 0) < (limit + (keyed == 1)) // 2:
                counts[key] = counts.get(key, 0) + 1
                chosen.append(statement)
    return sorted(chosen, key=statements.index)


def cai_config(config: ConfigDict) -> cai.CAIConfig:
    sample = lambda n: SamplingConfig(max_new_tokens=n, temperature=config.cai.temperature, top_p=config.cai.top_p)
    return cai.CAIConfig(
        rounds=config.cai.rounds, seed=config.seed,
        answer=sample(config.cai.answer_max_new_tokens),
        critique=sample(config.cai.critique_max_new_tokens),
        revision=sample(config.cai.revision_max_new_tokens),
        min_revision_words=config.cai.min_revision_words, keep_truncated=config.cai.keep_truncated,
        trim_truncated=config.cai.trim_truncated,
    )


def run_cai(config, run_dir, generator, constitution, train_prompts) -> list[dict]:
    settings = cai_config(config)
    stage = Stage(run_dir / "cai", {
        "model_id": generator.model.model_id, "constitution_sha256": constitution.sha256,
        "prompt_ids": [r.id for r in train_prompts], "cai": dataclasses.asdict(settings),
    })
    records_path = stage.folder / cai.RECORDS_FILE
    if stage.is_complete():
        logger.info("CAI data is up to date in %s; skipping", stage.folder)
        return [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]
    stage.begin()
    records = cai.generate_cai_records(generator, constitution, train_prompts, settings, stage.folder)
    cai.write_dataset(records, stage.folder, {"constitution": constitution.name, "model_id": generator.model.model_id,
                                              "stage_hash": stage.hash})
    stage.finish()
    return records


def sft_config(config: ConfigDict, num_examples: int):
    from ea_jax.sft import SFTConfig

    examples_per_step = config.sft.batch_size * config.sft.grad_accum_steps
    num_steps = config.sft.num_steps or max(1, -(-config.sft.num_epochs * num_examples // examples_per_step))
    return SFTConfig(
        learning_rate=config.sft.learning_rate, warmup_steps=min(config.sft.warmup_steps, num_steps - 1),
        num_steps=num_steps, batch_size=config.sft.batch_size, grad_accum_steps=config.sft.grad_accum_steps,
        max_grad_norm=config.sft.max_grad_norm, weight_decay=config.sft.weight_decay,
        max_length=config.sft.max_length, seed=config.seed, checkpoint_every=config.sft.checkpoint_every,
        log_every=config.sft.log_every,
    )


def run_sft(config, run_dir, source: LoadedModel, records: list[dict], cai_hash: str) -> LoadedModel:
    from ea_jax import checkpoints, sft

    examples = cai.sft_examples(records)
    if not examples:
        raise ConfigError(
            f"all {len(records)} CAI revisions were filtered out (see {run_dir / 'cai' / cai.MANIFEST_FILE}); "
            "nothing to finetune on. Raise cai.revision_max_new_tokens, or use more prompts"
        )
    settings = sft_config(config, len(examples))
    stage = Stage(run_dir / "sft", {"model_id": source.model_id, "cai_hash": cai_hash, "sft": dataclasses.asdict(settings)})
    model_dir = stage.folder / "model"
    if stage.is_complete():
        logger.info("finetuned model is up to date in %s; skipping SFT", model_dir)
        return load_model(str(model_dir), mesh=source.mesh)
    stage.begin()

    result = sft.train(source, examples, settings, stage.folder)
    model_id = f"{source.model_id}+sft:{stage.hash}"
    if model_dir.exists():
        # Written by this same stage before a crash stopped it from marking itself complete.
        shutil.rmtree(model_dir)
    checkpoints.save_checkpoint_folder(source, result.params, model_dir, model_id=model_id)
    io.atomic_write_json(stage.folder / "history.json", result.metrics)
    stage.finish()
    return dataclasses.replace(source, params=result.params, model_id=model_id, source=str(model_dir))


def run_evaluation(config, run_dir, name, generator, taxonomy, eval_prompts, benign, statements, trained, source_stage_hash=None):
    model = generator.model
    eval_config = evaluation.EvalConfig(
        sampling=SamplingConfig(max_new_tokens=config.eval.max_new_tokens), seed=config.seed,
        bootstrap_resamples=config.eval.bootstrap_resamples, persona_batch_size=config.eval.persona_batch_size,
    )
    stage = Stage(run_dir / "eval" / name, {
        "model_id": model.model_id, "eval_ids": [r.id for r in eval_prompts], "benign_ids": [r.id for r in benign],
        "statement_ids": [s.id for s in statements], "eval": dataclasses.asdict(eval_config),
        "judge": RefusalJudge.name,
    })
    labelled_path = stage.folder / "responses.jsonl"
    persona_path = stage.folder / "persona.jsonl"
    if stage.is_complete():
        logger.info("evaluation of the %s model is up to date; skipping", name)
    else:
        stage.begin()
        responses = evaluation.generate_responses(generator, eval_prompts, eval_config, stage.folder / "redteam.journal.jsonl", f"{name}: red-team")
        benign_responses = evaluation.generate_responses(generator, benign, eval_config, stage.folder / "benign.journal.jsonl", f"{name}: benign")
        judge = RefusalJudge()
        labelled = evaluation.label_responses(eval_prompts, responses, judge, "redteam")
        labelled += evaluation.label_responses(benign, benign_responses, judge, "benign")
        io.atomic_write_text(labelled_path, "".join(io.to_json(r, indent=None) + "\n" for r in labelled))

        p_yes = evaluation.score_statements(model, statements, eval_config.persona_batch_size)
        io.atomic_write_text(persona_path, "".join(io.to_json(r, indent=None) + "\n" for r in evaluation.statement_records(p_yes, statements)))
        stage.finish()

    labelled = [json.loads(line) for line in labelled_path.read_text().splitlines() if line.strip()]
    p_yes = [json.loads(line)["p_yes"] for line in persona_path.read_text().splitlines() if line.strip()]
    return labelled, p_yes


def compute_metrics(config, taxonomy, constitution, trained, labelled_by_model, p_yes_by_model, statements, models) -> dict:
    import numpy as np

    n_resamples = config.eval.bootstrap_resamples
    metrics = {"models": models, "constitution": constitution.name, "scope": config.scope,
               "trained_subcategories": list(trained), "filtered_out": list(config.filtered_out),
               "expected_signature": constitution.expected_signature, "judge": RefusalJudge.name,
               "safety": {}, "persona": {}}
    for name, labelled in labelled_by_model.items():
        metrics["safety"][name] = evaluation.safety_metrics(
            labelled, taxonomy, trained_subcategories=trained, filtered_out=config.filtered_out,
            seed=config.seed, n_resamples=n_resamples,
        )
    source_p_yes = np.asarray(p_yes_by_model["source"])
    for name, p_yes in p_yes_by_model.items():
        metrics["persona"][name] = evaluation.persona_metrics(
            np.asarray(p_yes), statements, source_p_yes=None if name == "source" else source_p_yes,
            expected_signature=None if name == "source" else constitution.expected_signature,
            seed=config.seed, n_resamples=n_resamples,
        )
    metrics["safety_change"] = evaluation.safety_change(
        labelled_by_model["source"], labelled_by_model["finetuned"], taxonomy,
        trained_subcategories=trained, filtered_out=config.filtered_out, seed=config.seed, n_resamples=n_resamples,
    )
    return metrics


def run(config: ConfigDict) -> Path:
    """Run every stage for `config` and return the path of report.md."""
    started = time.time()
    validate_config(config)
    constitution = load_constitution(config.constitution)
    # Absolute, because Orbax rejects relative checkpoint paths when a later run resumes.
    run_dir = (Path(config.output_dir) / run_name(config)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    env = environment_info()
    logger.info("run folder %s; git commit %s; jax %s on %s", run_dir, env["git_commit"], env["packages"]["jax"], env["devices"])
    logger.info("resolved config:\n%s", config)

    # `trained` lists the scope's subcategories even when data.max_train_prompts leaves some unused.
    taxonomy, trained, train_prompts, eval_prompts, benign = select_prompts(config, run_dir)
    statements = select_statements(config)

    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    # Pre-flight: every divisibility problem is reported here, before weights load or anything compiles.
    run_plan, _ = plan.plan_from_config(config, mesh.devices.size)
    plan.check_plan(run_plan)
    source = load_model(config.model.source, mesh=mesh)
    # Written only once the inputs passed every early check, so a rejected rerun leaves the
    # record of the run that produced this folder intact.
    io.atomic_write_json(run_dir / "config.json", config.to_dict())
    io.atomic_write_json(run_dir / "environment.json", env)
    gen_kwargs = dict(batch_size=config.generation.batch_size, max_cache_length=config.model.max_cache_length,
                      chunk_size=config.generation.chunk_size)
    source_generator = Generator(source, **gen_kwargs)

    records = run_cai(config, run_dir, source_generator, constitution, train_prompts)
    cai_hash = json.loads((run_dir / "cai" / "stage.json").read_text())["hash"]
    finetuned = run_sft(config, run_dir, source, records, cai_hash)

    labelled, p_yes = {}, {}
    for name, model in (("source", source), ("finetuned", finetuned)):
        generator = source_generator if name == "source" else Generator(model, **gen_kwargs)
        labelled[name], p_yes[name] = run_evaluation(
            config, run_dir, name, generator, taxonomy, eval_prompts, benign, statements, trained,
        )

    models = {"source": source.model_id, "finetuned": finetuned.model_id}
    metrics = compute_metrics(config, taxonomy, constitution, trained, labelled, p_yes, statements, models)
    metrics["cai_manifest"] = json.loads((run_dir / "cai" / cai.MANIFEST_FILE).read_text())
    metrics["elapsed_seconds"] = round(time.time() - started, 1)
    history_path = run_dir / "sft" / "history.json"
    metrics["sft"] = {
        "num_examples": metrics["cai_manifest"]["num_kept"],
        "settings": json.loads((run_dir / "sft" / "stage.json").read_text())["key"]["sft"],
        "last_steps": json.loads(history_path.read_text())[-3:] if history_path.is_file() else [],
    }
    io.atomic_write_json(run_dir / "metrics.json", metrics)
    report_path = report.write_report(run_dir, metrics, taxonomy, env)
    return report_path


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by bad input: reported as one message and exit status 2, without a traceback."""
    from ea_jax.checkpoints import CheckpointError
    from ea_jax.generation import GenerationConfigError
    from ea_jax.sft import SFTError

    return (ConfigError, ConstitutionError, prompts.PromptFileError, prompts.ScopeError, ModelLoadError,
            PromptTooLongError, persona.PersonaFileError, SFTError, CheckpointError, sharding.ShardingError,
            GenerationConfigError)


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # Orbax logs every checkpoint write through absl at INFO; keep its warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/consequentialist_narrow.py")
    try:
        report_path = run(config)
    except user_errors() as error:
        logger.error("%s", error)
        sys.exit(2)
    print(f"\nReport: {report_path}")
    print(f"Run folder: {report_path.parent}")


def parse_flags(argv: list[str]) -> list[str]:
    """Parse flags, turning a misspelled or ill-typed --config field into one message and exit 2."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as error:
        # ml_collections reports an unknown field as the repr of a KeyError: unquote it.
        text = str(error).replace("\\n", "\n").replace("\\'", "'")
        message = " ".join(line.strip(" '\"") for line in text.splitlines() if line.strip(" '\"")) or repr(error)
        print(f"error: invalid command line: {message}\nSee configs/base.py for the fields and their types.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)
