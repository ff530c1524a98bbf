"""Constitutional-AI data: answer, then rounds of critique and revision against drawn principles.

For each red-team prompt in scope the source model
1. answers the prompt (the initial response),
2. for each round r = 1..R: critiques its latest response against a principle drawn with a
   seeded draw from the constitution, then revises the response following that principle.

Critique and revision prompts are chat conversations: the constitution's preamble as the system
message, the constitution's worked demonstrations as earlier turns (few-shot context), then the
prompt, the latest response, the critique request and, for the revision, the critique. Each
stage is journalled to JSONL as it completes, so a rerun after a crash continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ea_jax import io
from ea_jax.chat import Message
from ea_jax.constitutions import Constitution, Principle, draw_principle, principle_by_id
from ea_jax.generation import FINISH_LENGTH, Generator, SamplingConfig, generate_journalled, stable_row_id
from ea_jax.prompts import PromptRecord

logger = logging.getLogger(__name__)

INITIAL_JOURNAL = "initial.jsonl"
RECORDS_FILE = "cai.jsonl"
DATASET_DIR = "dataset"
MANIFEST_FILE = "manifest.json"

# Revisions that talk about the rewriting instead of replying to the user.
_META_TALK = re.compile(
    r"\b(revised (response|version|answer)|rewritten (response|version)|previous response|"
    r"original response|here is (the|my) (revision|rewrite)|the critique|this revision|"
    r"the assistant'?s (last |previous )?response)\b",
    re.IGNORECASE,
)


@dataclasses.dataclass(frozen=True)
class CAIConfig:
    rounds: int = 1
    seed: int = 0
    # Sampling rather than greedy decoding: a 135M-parameter model loops under greedy decoding.
    answer: SamplingConfig = SamplingConfig(max_new_tokens=160, temperature=0.7, top_p=0.9)
    critique: SamplingConfig = SamplingConfig(max_new_tokens=128, temperature=0.7, top_p=0.9)
    revision: SamplingConfig = SamplingConfig(max_new_tokens=192, temperature=0.7, top_p=0.9)
    journal_every: int = 32  # prompts per generation call between journal writes
    min_revision_words: int = 3
    # A revision cut off at max_new_tokens is trimmed back to its last complete sentence when
    # trim_truncated is set. Otherwise it is dropped, because it would teach the model to stop
    # mid-sentence, unless keep_truncated is set (useful only for smoke tests).
    trim_truncated: bool = True
    keep_truncated: bool = False

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"cai.rounds={self.rounds} must be at least 1")


# ---------------------------------------------------------------------------------------------
# Prompt construction (pure).


def answer_conversation(prompt: str) -> list[Message]:
    """Build the conversation for the initial response: the prompt alone, under the model's default system prompt."""
    return [{"role": "user", "content": prompt}]


def _demonstration_turns(constitution: Constitution) -> list[Message]:
    turns: list[Message] = []
    for demo in constitution.demonstrations:
        principle = principle_by_id(constitution, demo.principle_id)
        turns += [
            {"role": "user", "content": demo.prompt},
            {"role": "assistant", "content": demo.response},
            {"role": "user", "content": principle.critique_request},
            {"role": "assistant", "content": demo.critique},
            {"role": "user", "content": principle.revision_request},
            {"role": "assistant", "content": demo.revision},
        ]
    return turns


def critique_conversation(constitution: Constitution, prompt: str, response: str, principle: Principle) -> list[Message]:
    return [
        {"role": "system", "content": constitution.preamble},
        *_demonstration_turns(constitution),
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": response},
        {"role": "user", "content": principle.critique_request},
    ]


def revision_conversation(
    constitution: Constitution, prompt: str, response: str, principle: Principle, critique: str
) -> list[Message]:
    return critique_conversation(constitution, prompt, response, principle) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": principle.revision_request},
    ]


def draw_principles(constitution: Constitution, prompt_ids: Sequence[str], rounds: int, seed: int) -> dict[str, list[str]]:
    """Principle ids per prompt and round, from one seeded generator per prompt.

    Each prompt's generator is seeded by (seed, a hash of the prompt id), so a prompt's
    principles stay fixed when other prompts are added or removed.
    """
    drawn = {}
    for prompt_id in prompt_ids:
        id_seed = int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng([seed, id_seed])
        drawn[prompt_id] = [draw_principle(constitution, rng).id for _ in range(rounds)]
    return drawn


def stage_seed(seed: int, round_number: int, stage: str) -> int:
    """Derive a sampling seed per (run seed, round, stage), so no two stages or seeds share keys."""
    stage_id = int(hashlib.sha256(stage.encode()).hexdigest()[:8], 16)
    return int(np.random.SeedSequence([seed, round_number, stage_id]).generate_state(1)[0] & 0x7FFFFFFF)


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)|\n\n")


def trim_to_last_sentence(text: str, min_fraction: float = 0.5) -> str | None:
    """Cut `text` after its last complete sentence, or return None if that loses over half of it.

    Text generated up to max_new_tokens usually ends mid-sentence; the sentences before the
    cut are a complete reply. A sentence ends at ., ! or ? followed by whitespace (closing
    quotes or brackets allowed) or at a blank line.
    """
    ends = [match.end() for match in _SENTENCE_END.finditer(text + " ")]
    if not ends:
        return None
    trimmed = text[: ends[-1]].rstrip()
    if len(trimmed) < min_fraction * len(text.rstrip()):
        return None
    return trimmed


def filter_reason(revision: str, finish_reason: str, min_words: int, keep_truncated: bool = False) -> str | None:
    """Return why a revision is unusable as a training target, or None when it is usable."""
    if not revision.strip():
        return "empty"
    if finish_reason == FINISH_LENGTH and not keep_truncated:
        return "truncated"
    if len(revision.split()) < min_words:
        return "too_short"
    if _META_TALK.search(revision):
        return "meta_talk"
    return None


# ---------------------------------------------------------------------------------------------
# Generation.


def generate_initial_responses(
    generator: Generator, prompts: Sequence[PromptRecord], config: CAIConfig, journal: Path
) -> dict[str, dict]:
    """Generate the source model's initial responses, which do not depend on the constitution."""
    jobs = [(record.id, stable_row_id(record.id), answer_conversation(record.prompt)) for record in prompts]
    seed = stage_seed(config.seed, 0, "answer")
    return generate_journalled(generator, journal, jobs, config.answer, seed, config.journal_every, "initial answers")


def generate_cai_records(
    generator: Generator,
    constitution: Constitution,
    prompts: Sequence[PromptRecord],
    config: CAIConfig,
    work_dir: Path,
    initial_journal: Path | None = None,
) -> list[dict]:
    """Run answer -> (critique -> revision) x rounds for every prompt; return one record each."""
    work_dir = Path(work_dir)
    initial_journal = initial_journal or work_dir / INITIAL_JOURNAL
    initial = generate_initial_responses(generator, prompts, config, initial_journal)
    principles = draw_principles(constitution, [record.id for record in prompts], config.rounds, config.seed)

    latest = {record.id: initial[record.id] for record in prompts}
    rounds: dict[str, list[dict]] = {record.id: [] for record in prompts}
    for round_index in range(config.rounds):
        by_id = {record.id: record for record in prompts}
        principle_of = {pid: principle_by_id(constitution, principles[pid][round_index]) for pid in by_id}

        critique_jobs = [
            (pid, stable_row_id(pid), critique_conversation(constitution, by_id[pid].prompt, latest[pid]["text"], principle_of[pid]))
            for pid in by_id
        ]
        critiques = generate_journalled(
            generator, work_dir / f"round{round_index + 1}_critique.jsonl", critique_jobs, config.critique,
            stage_seed(config.seed, round_index + 1, "critique"), config.journal_every, f"round {round_index + 1} critiques",
        )

        revision_jobs = [
            (pid, stable_row_id(pid), revision_conversation(
                constitution, by_id[pid].prompt, latest[pid]["text"], principle_of[pid], critiques[pid]["text"]))
            for pid in by_id
        ]
        revisions = generate_journalled(
            generator, work_dir / f"round{round_index + 1}_revision.jsonl", revision_jobs, config.revision,
            stage_seed(config.seed, round_index + 1, "revision"), config.journal_every, f"round {round_index + 1} revisions",
        )

        for pid in by_id:
            rounds[pid].append({
                "round": round_index + 1,
                "principle_id": principle_of[pid].id,
                "critique_request": principle_of[pid].critique_request,
                "critique": critiques[pid]["text"],
                "critique_finish_reason": critiques[pid]["finish_reason"],
                "revision_request": principle_of[pid].revision_request,
                "revision": revisions[pid]["text"],
                "revision_finish_reason": revisions[pid]["finish_reason"],
            })
            latest[pid] = revisions[pid]

    records = []
    for record in prompts:
        final = rounds[record.id][-1]
        revision, finish_reason = final["revision"], final["revision_finish_reason"]
        trimmed = False
        if finish_reason == FINISH_LENGTH and config.trim_truncated:
            cut = trim_to_last_sentence(revision)
            if cut is not None:
                revision, finish_reason, trimmed = cut, "trimmed", True
        reason = filter_reason(revision, finish_reason, config.min_revision_words, config.keep_truncated)
        records.append({
            "id": record.id,
            "prompt": record.prompt,
            "category": record.category,
            "subcategory": record.subcategory,
            "tags": list(record.tags),
            "initial_response": initial[record.id]["text"],
            "initial_finish_reason": initial[record.id]["finish_reason"],
            "rounds": rounds[record.id],
            "revision": revision,  # the SFT target: the last round's revision, trimmed if it was cut off
            "revision_trimmed": trimmed,
            "principle_ids": [entry["principle_id"] for entry in rounds[record.id]],
            "constitution": constitution.name,
            "constitution_sha256": constitution.sha256,
            "model_id": generator.model.model_id,
            "seed": config.seed,
            "kept": reason is None,
            "filter_reason": reason,
        })
    return records


def write_dataset(records: list[dict], output_dir: Path, extra_manifest: dict) -> dict:
    """Write records as JSONL and as a `datasets` folder, plus a manifest with counts.

    The `datasets` folder holds only kept records (the SFT targets); the JSONL holds all of
    them with their filter reason. Both are staged and renamed, so a crash leaves no partial
    dataset.
    """
    from datasets import Dataset

    output_dir = Path(output_dir)
    kept = [record for record in records if record["kept"]]
    reasons: dict[str, int] = {}
    for record in records:
        if record["filter_reason"]:
            reasons[record["filter_reason"]] = reasons.get(record["filter_reason"], 0) + 1
    per_subcategory: dict[str, int] = {}
    for record in kept:
        per_subcategory[record["subcategory"]] = per_subcategory.get(record["subcategory"], 0) + 1

    staging = output_dir / f".{DATASET_DIR}.staging"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    flat = [{**record, "rounds": io.to_json(record["rounds"], indent=None)} for record in kept]
    Dataset.from_list(flat).save_to_disk(str(staging))
    io.replace_directory(staging, output_dir / DATASET_DIR)
    io.atomic_write_text(output_dir / RECORDS_FILE, "".join(io.to_json(r, indent=None) + "\n" for r in records))

    manifest = {
        "num_prompts": len(records),
        "num_kept": len(kept),
        "num_trimmed": sum(bool(record.get("revision_trimmed")) for record in kept),
        "num_filtered": len(records) - len(kept),
        "filtered_by_reason": reasons,
        "kept_per_subcategory": per_subcategory,
        **extra_manifest,
    }
    io.atomic_write_json(output_dir / MANIFEST_FILE, manifest)
    logger.info("CAI data: %d of %d revisions kept (%s filtered)", len(kept), len(records), reasons or "none")
    return manifest


def sft_examples(records: Sequence[dict]) -> list[list[Message]]:
    """Build SFT chat examples, the red-team prompt and its final revision, from kept records only."""
    return [
        [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["revision"]}]
        for record in records
        if record["kept"]
    ]
