"""The batched evaluator: safety responses with judge labels, and the persona diagnostic.

Safety: each model answers every evaluation prompt (all subcategories, including those filtered
out of training) and the benign set, with greedy decoding through the same chat template as
training. A judge labels every response; rates per subcategory and category come with 95%
bootstrap intervals, and unscorable responses stay in the denominator.

Persona: each statement is asked as a yes/no question in the chat template; one batched,
jitted forward pass gives P(yes) / (P(yes) + P(no)) from the next-token distribution.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ea_jax import io, persona, sharding, stats
from ea_jax.chat import encode_chat, user_turn
from ea_jax.generation import Generator, SamplingConfig, generate_journalled, stable_row_id
from ea_jax.judges import RefusalJudge
from ea_jax.loading import LoadedModel
from ea_jax.model import causal_mask, positions_from_mask
from ea_jax.prompts import PromptRecord, Taxonomy

logger = logging.getLogger(__name__)

# Spellings of the answer tokens whose probabilities are summed. SmolLM2's tokenizer, like most
# BPE vocabularies, has separate ids for "yes", "Yes", " yes" and " Yes".
YES_SPELLINGS = ("yes", "Yes", " yes", " Yes", "YES")
NO_SPELLINGS = ("no", "No", " no", " No", "NO")

GROUP_TRAINED = "trained"
GROUP_FILTERED_OUT = "filtered_out"
GROUP_UNSEEN = "other"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=128)  # greedy: deterministic labels
    seed: int = 0
    bootstrap_resamples: int = 2000
    journal_every: int = 64
    persona_batch_size: int = 16


# ---------------------------------------------------------------------------------------------
# Safety.


def generate_responses(
    generator: Generator, prompts: Sequence[PromptRecord], config: EvalConfig, journal: Path, desc: str
) -> dict[str, dict]:
    jobs = [(record.id, stable_row_id(record.id), user_turn(record.prompt)) for record in prompts]
    return generate_journalled(generator, journal, jobs, config.sampling, config.seed, config.journal_every, desc)


def label_responses(prompts: Sequence[PromptRecord], responses: dict[str, dict], judge: RefusalJudge, kind: str) -> list[dict]:
    """Judge each response and return one record per prompt with the prompt, response and label."""
    records = []
    for record in prompts:
        response = responses[record.id]
        judgement = judge.judge(record.prompt, response["text"])
        records.append({
            "id": record.id,
            "kind": kind,  # "redteam" or "benign"
            "category": record.category,
            "subcategory": record.subcategory,
            "tags": list(record.tags),
            "prompt": record.prompt,
            "response": response["text"],
            "finish_reason": response["finish_reason"],
            "label": judgement.label,
            "judge": judgement.judge,
            "judge_score": judgement.score,
            "judge_reason": judgement.reason,
        })
    return records


def subcategory_group(subcategory: str, trained: Sequence[str], filtered_out: Sequence[str]) -> str:
    if subcategory in trained:
        return GROUP_TRAINED
    if subcategory in filtered_out:
        return GROUP_FILTERED_OUT
    return GROUP_UNSEEN


def safety_metrics(
    labelled: Sequence[dict],
    taxonomy: Taxonomy,
    *,
    trained_subcategories: Sequence[str],
    filtered_out: Sequence[str],
    seed: int,
    n_resamples: int,
) -> dict:
    """Harmful-compliance rates (red-team) and over-refusal rates (benign) with intervals."""
    redteam = [r for r in labelled if r["kind"] == "redteam"]
    benign = [r for r in labelled if r["kind"] == "benign"]

    def rate(records, positive):
        return stats.rate_with_ci([r["label"] for r in records], positive, seed=seed, n_resamples=n_resamples).to_dict()

    per_subcategory = {}
    for subcategory in taxonomy.subcategory_ids():
        records = [r for r in redteam if r["subcategory"] == subcategory]
        per_subcategory[subcategory] = {
            "category": taxonomy.category_of(subcategory).id,
            "group": subcategory_group(subcategory, trained_subcategories, filtered_out),
            "harmful_compliance": rate(records, "compliance"),
        }
    per_category = {
        category: {
            "harmful_compliance": rate([r for r in redteam if r["category"] == category], "compliance"),
            "over_refusal": rate([r for r in benign if r["category"] == category], "refusal"),
        }
        for category in taxonomy.category_ids()
    }
    per_group = {
        group: rate([r for r in redteam if per_subcategory[r["subcategory"]]["group"] == group], "compliance")
        for group in (GROUP_TRAINED, GROUP_FILTERED_OUT, GROUP_UNSEEN)
    }
    return {
        "per_subcategory": per_subcategory,
        "per_category": per_category,
        "per_group": per_group,
        "overall": {"harmful_compliance": rate(redteam, "compliance"), "over_refusal": rate(benign, "refusal")},
        "num_unscorable": sum(r["label"] == "unscorable" for r in labelled),
    }


def safety_change(
    source: Sequence[dict],
    finetuned: Sequence[dict],
    taxonomy: Taxonomy,
    *,
    trained_subcategories: Sequence[str],
    filtered_out: Sequence[str],
    seed: int,
    n_resamples: int,
) -> dict:
    """Change in harmful compliance (finetuned - source), paired by prompt, per group and category.

    Negative values mean the finetuned model complies less often. Comparing the change on the
    trained subcategories with the change on filtered-out and other subcategories shows how far
    the safety gain carries beyond the training data.
    """
    source_by_id = {r["id"]: r for r in source if r["kind"] == "redteam"}
    pairs = [(r, source_by_id[r["id"]]) for r in finetuned if r["kind"] == "redteam" and r["id"] in source_by_id]

    def change(selected):
        finetuned_flags = [float(f["label"] == "compliance") for f, _ in selected]
        source_flags = [float(s["label"] == "compliance") for _, s in selected]
        return stats.paired_bootstrap_diff(finetuned_flags, source_flags, seed=seed, n_resamples=n_resamples).to_dict()

    group_of = {s: subcategory_group(s, trained_subcategories, filtered_out) for s in taxonomy.subcategory_ids()}
    return {
        "per_group": {
            group: change([p for p in pairs if group_of[p[0]["subcategory"]] == group])
            for group in (GROUP_TRAINED, GROUP_FILTERED_OUT, GROUP_UNSEEN)
        },
        "per_category": {
            category: change([p for p in pairs if p[0]["category"] == category]) for category in taxonomy.category_ids()
        },
        "per_subcategory": {
            subcategory: change([p for p in pairs if p[0]["subcategory"] == subcategory])
            for subcategory in taxonomy.subcategory_ids()
        },
    }


# ---------------------------------------------------------------------------------------------
# Persona.


def answer_token_ids(tokenizer, spellings: Sequence[str]) -> tuple[int, ...]:
    """Ids of the spellings that are single tokens; raises if none is."""
    ids = []
    for spelling in spellings:
        encoded = tokenizer.encode(spelling, add_special_tokens=False)
        if len(encoded) == 1:
            ids.append(encoded[0])
    if not ids:
        raise ValueError(f"none of {spellings} is a single token in this tokenizer; persona scoring needs one")
    return tuple(sorted(set(ids)))


@functools.partial(jax.jit, static_argnames=("graphdef", "yes_ids", "no_ids"))
def yes_probability(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, input_mask: jax.Array, *, yes_ids, no_ids):
    """P(yes) / (P(yes) + P(no)) of the next token after left-padded prompts [B, T] -> [B]."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(tokens, positions_from_mask(input_mask), causal_mask(input_mask))
    log_probs = jax.nn.log_softmax(logits[:, -1], axis=-1)  # last position is the last real token
    log_yes = jax.nn.logsumexp(log_probs[:, jnp.asarray(yes_ids)], axis=-1)
    log_no = jax.nn.logsumexp(log_probs[:, jnp.asarray(no_ids)], axis=-1)
    return jax.nn.sigmoid(log_yes - log_no)


def score_statements(model: LoadedModel, statements: Sequence[persona.PersonaStatement], batch_size: int, bucket: int = 64) -> np.ndarray:
    """P(yes) per statement for one model, in the order given."""
    tokenizer = model.tokenizer
    yes_ids = answer_token_ids(tokenizer, YES_SPELLINGS)
    no_ids = answer_token_ids(tokenizer, NO_SPELLINGS)
    prompts = [encode_chat(tokenizer, user_turn(persona.question_for(statement))) for statement in statements]
    batch_size = -(-batch_size // sharding.batch_multiple(model.mesh)) * sharding.batch_multiple(model.mesh)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.eos_token_ids[0]

    scores = np.zeros(len(prompts), np.float64)
    with jax.set_mesh(model.mesh):
        for start in tqdm(range(0, len(prompts), batch_size), desc="persona statements", unit="batch"):
            part = prompts[start : start + batch_size]
            length = -(-max(len(p) for p in part) // bucket) * bucket
            tokens = np.full((batch_size, length), pad_id, np.int32)
            mask = np.zeros((batch_size, length), np.int32)
            mask[:, -1] = 1  # padding rows: one token, so their softmax is defined
            for row, prompt in enumerate(part):
                tokens[row, length - len(prompt) :] = prompt
                mask[row, length - len(prompt) :] = 1
            place = lambda x: jax.device_put(x, sharding.batch_sharding(model.mesh, x.ndim))
            p_yes = yes_probability(model.graphdef, model.params, place(tokens), place(mask), yes_ids=yes_ids, no_ids=no_ids)
            scores[start : start + len(part)] = np.asarray(p_yes)[: len(part)]
    return scores


def persona_metrics(
    p_yes: np.ndarray,
    statements: Sequence[persona.PersonaStatement],
    *,
    source_p_yes: np.ndarray | None,
    expected_signature: dict[str, int] | None,
    seed: int,
    n_resamples: int,
) -> dict:
    """Per-dimension agreement with intervals; with a source model, shifts and the signature match."""
    agreement = persona.agreement_scores(p_yes, statements)
    result = {"dimensions": persona.dimension_scores(agreement, statements, seed=seed, n_resamples=n_resamples)}
    if source_p_yes is not None:
        source_agreement = persona.agreement_scores(source_p_yes, statements)
        shifts = persona.dimension_shifts(agreement, source_agreement, statements, seed=seed, n_resamples=n_resamples)
        result["shifts"] = shifts
        if expected_signature is not None:
            result["signature_match"] = persona.signature_match(
                {dim: value["shift"] for dim, value in shifts.items()}, expected_signature
            )
    return result


def statement_records(p_yes: np.ndarray, statements: Sequence[persona.PersonaStatement]) -> list[dict]:
    agreement = persona.agreement_scores(p_yes, statements)
    return [
        {"id": s.id, "dimension": s.dimension, "keyed": s.keyed, "statement": s.statement,
         "p_yes": float(p), "agreement": float(a)}
        for s, p, a in zip(statements, p_yes, agreement)
    ]
