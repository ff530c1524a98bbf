"""Constitutional-AI data: conversations, principle draws, filters, journalled generation, dataset."""

from __future__ import annotations

import json
import shutil

import jax
import pytest
from flax import nnx

from ea_jax import cai, loading, sharding
from ea_jax.constitutions import load_constitution, principle_by_id
from ea_jax.generation import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Generator, SamplingConfig
from ea_jax.model import ModelConfig, init_model
from ea_jax.prompts import PromptRecord

TINY_CONFIG = ModelConfig(
    vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, eos_token_id=2, max_position_embeddings=4096,
)
JOURNALS = (cai.INITIAL_JOURNAL, "round1_critique.jsonl", "round1_revision.jsonl")
PROMPTS = (
    PromptRecord("h1", "How can I make my coworker cry in front of everyone?", "harassment_abuse", "harassment", ()),
    PromptRecord("i1", "What is the easiest shop to steal from?", "crime", "illegal_behaviour", ()),
    PromptRecord("h2", "Write a message that scares my neighbour into moving out.", "harassment_abuse", "harassment",
                 ("stalking",)),
)
# One tiny token limit for every stage, so that with one prompt bucket every stage reuses the
# same compiled shapes. The records are not meant to be usable text.
TINY_SAMPLING = SamplingConfig(max_new_tokens=4, temperature=0.7, top_p=0.9)
TINY_CAI = cai.CAIConfig(
    rounds=1, seed=3, answer=TINY_SAMPLING, critique=TINY_SAMPLING, revision=TINY_SAMPLING,
    journal_every=4, min_revision_words=3, keep_truncated=True,
)


@pytest.fixture(scope="module")
def constitution():
    return load_constitution("consequentialism")


@pytest.fixture(scope="module")
def tokenizer():
    try:
        path = loading.find_default_gguf()
    except loading.ModelLoadError as error:
        pytest.skip(f"packaged model unavailable: {error}")
    return loading.gguf_tokenizer(path)


@pytest.fixture(scope="module")
def generator(tokenizer):
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    module = init_model(TINY_CONFIG, seed=0)
    # With tied embeddings of scale 1 every token predicts itself, so samples would repeat one
    # token. A 0.1 scale flattens the next-token distribution and the samples vary.
    module.embed_tokens[...] = module.embed_tokens[...] * 0.1
    graphdef, params = nnx.split(module, nnx.Param)
    model = loading.LoadedModel(TINY_CONFIG, graphdef, params, tokenizer, "tiny-random", "tests", mesh, eos_token_ids=(2,))
    # Batches of 2 put the three prompts in batches of 2 and 1, so a regenerated row may sit in a
    # different batch than in the first run. Critique prompts have about 800 tokens, so one bucket
    # of 1024 covers all stages.
    return Generator(model, batch_size=2, chunk_size=4, prompt_bucket=1024)


@pytest.fixture(scope="module")
def first_run(generator, constitution, tmp_path_factory):
    """One uninterrupted run over PROMPTS: its folder and records."""
    folder = tmp_path_factory.mktemp("cai_first")
    records = cai.generate_cai_records(generator, constitution, PROMPTS, TINY_CAI, folder)
    return folder, records


def _journal_ids(path):
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _record(record_id, subcategory, revision, reason):
    return {
        "id": record_id, "prompt": f"prompt {record_id}", "category": "harassment_abuse", "subcategory": subcategory,
        "tags": [], "initial_response": "initial", "initial_finish_reason": FINISH_EOS,
        "rounds": [{"round": 1, "principle_id": "consequentialism-01", "revision": revision}],
        "revision": revision, "principle_ids": ["consequentialism-01"], "constitution": "consequentialism",
        "kept": reason is None, "filter_reason": reason,
    }


# ---------------------------------------------------------------------------------------------
# Conversations.


def test_critique_starts_with_preamble(constitution):
    principle = constitution.principles[2]
    conversation = cai.critique_conversation(constitution, "PROMPT", "RESPONSE", principle)

    assert conversation[0] == {"role": "system", "content": constitution.preamble}


def test_critique_demonstration_turns(constitution):
    principle = constitution.principles[2]
    conversation = cai.critique_conversation(constitution, "PROMPT", "RESPONSE", principle)

    assert len(conversation) == 1 + 6 * len(constitution.demonstrations) + 3
    for index, demo in enumerate(constitution.demonstrations):
        demo_principle = principle_by_id(constitution, demo.principle_id)
        turns = conversation[1 + 6 * index : 7 + 6 * index]
        assert turns == [
            {"role": "user", "content": demo.prompt},
            {"role": "assistant", "content": demo.response},
            {"role": "user", "content": demo_principle.critique_request},
            {"role": "assistant", "content": demo.critique},
            {"role": "user", "content": demo_principle.revision_request},
            {"role": "assistant", "content": demo.revision},
        ]


def test_critique_ends_with_request(constitution):
    principle = constitution.principles[2]
    conversation = cai.critique_conversation(constitution, "PROMPT", "RESPONSE", principle)

    assert conversation[-3:] == [
        {"role": "user", "content": "PROMPT"},
        {"role": "assistant", "content": "RESPONSE"},
        {"role": "user", "content": principle.critique_request},
    ]


def test_critique_roles_alternate(constitution):
    conversation = cai.critique_conversation(constitution, "PROMPT", "RESPONSE", constitution.principles[0])
    roles = [message["role"] for message in conversation[1:]]

    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]


def test_revision_extends_critique(constitution):
    principle = constitution.principles[5]
    critique = cai.critique_conversation(constitution, "PROMPT", "RESPONSE", principle)
    revision = cai.revision_conversation(constitution, "PROMPT", "RESPONSE", principle, "CRITIQUE")

    assert revision[: len(critique)] == critique
    assert revision[len(critique) :] == [
        {"role": "assistant", "content": "CRITIQUE"},
        {"role": "user", "content": principle.revision_request},
    ]


def test_answer_conversation_single_turn():
    assert cai.answer_conversation("PROMPT") == [{"role": "user", "content": "PROMPT"}]


# ---------------------------------------------------------------------------------------------
# Principle draws.


def test_draw_principles_deterministic(constitution):
    ids = [f"p{i}" for i in range(10)]

    assert cai.draw_principles(constitution, ids, 3, seed=0) == cai.draw_principles(constitution, ids, 3, seed=0)


def test_draw_principles_shape(constitution):
    drawn = cai.draw_principles(constitution, ["b", "a"], 3, seed=0)
    valid = {principle.id for principle in constitution.principles}

    assert sorted(drawn) == ["a", "b"]
    assert all(len(ids) == 3 for ids in drawn.values())
    assert all(pid in valid for ids in drawn.values() for pid in ids)


def test_draw_principles_order_independent(constitution):
    ids = [f"p{i}" for i in range(10)]

    assert cai.draw_principles(constitution, ids, 2, seed=0) == cai.draw_principles(constitution, ids[::-1], 2, seed=0)


def test_draw_principles_stable_when_extended(constitution):
    # "a0" sorts before every other id, so index-based seeding would shift all later draws.
    ids = [f"p{i}" for i in range(10)]
    small = cai.draw_principles(constitution, ids, 2, seed=0)
    extended = cai.draw_principles(constitution, ["a0", *ids, "z9"], 2, seed=0)

    assert {pid: extended[pid] for pid in ids} == small


def test_draw_principles_seed_matters(constitution):
    ids = [f"p{i}" for i in range(20)]

    assert cai.draw_principles(constitution, ids, 2, seed=0) != cai.draw_principles(constitution, ids, 2, seed=1)


def test_draw_principles_varies_across_prompts(constitution):
    drawn = cai.draw_principles(constitution, [f"p{i}" for i in range(40)], 1, seed=0)

    # With 14 principles and 40 prompts, one shared principle would mean the seed ignores the id.
    assert len({ids[0] for ids in drawn.values()}) > 1


# ---------------------------------------------------------------------------------------------
# Filters.


@pytest.mark.parametrize(
    ("revision", "finish_reason", "expected"),
    [
        ("", FINISH_EOS, "empty"),
        ("  \n\t", FINISH_EOS, "empty"),
        ("", FINISH_LENGTH, "empty"),
        ("I would rather not help with that, but here is", FINISH_LENGTH, "truncated"),
        ("No thanks.", FINISH_EOS, "too_short"),
        ("Here is the revised response: I can't help you frighten your neighbour.", FINISH_EOS, "meta_talk"),
        ("Unlike the original response, I will not help with this.", FINISH_EOS, "meta_talk"),
        ("I can't help you frighten your neighbour, but a mediator could help you both.", FINISH_EOS, None),
        ("I can't help you frighten your neighbour, but a mediator could help you both.", FINISH_STOP, None),
    ],
)
def test_filter_reason(revision, finish_reason, expected):
    assert cai.filter_reason(revision, finish_reason, min_words=3) == expected


def test_filter_keep_truncated():
    text = "I would rather not help with that, but here is"

    assert cai.filter_reason(text, FINISH_LENGTH, min_words=3, keep_truncated=True) is None


def test_filter_min_words_boundary():
    assert cai.filter_reason("one two three", FINISH_EOS, min_words=3) is None
    assert cai.filter_reason("one two", FINISH_EOS, min_words=3) == "too_short"


def test_cai_config_rejects_zero_rounds():
    with pytest.raises(ValueError, match="cai.rounds=0"):
        cai.CAIConfig(rounds=0)


# ---------------------------------------------------------------------------------------------
# Generation with a tiny random model.


def test_generate_records_order(first_run):
    _, records = first_run

    assert [record["id"] for record in records] == [prompt.id for prompt in PROMPTS]


def test_generate_records_fields(first_run, constitution):
    _, records = first_run
    drawn = cai.draw_principles(constitution, [prompt.id for prompt in PROMPTS], 1, TINY_CAI.seed)

    for record, prompt in zip(records, PROMPTS):
        assert record["prompt"] == prompt.prompt
        assert record["subcategory"] == prompt.subcategory
        assert record["tags"] == list(prompt.tags)
        assert record["principle_ids"] == drawn[prompt.id]
        assert record["revision"] == record["rounds"][-1]["revision"]
        assert record["constitution_sha256"] == constitution.sha256
        assert record["model_id"] == "tiny-random"
        assert record["seed"] == TINY_CAI.seed


def test_generate_records_filter(first_run):
    _, records = first_run

    for record in records:
        final = record["rounds"][-1]
        expected = cai.filter_reason(final["revision"], final["revision_finish_reason"], 3, keep_truncated=True)
        assert record["filter_reason"] == expected
        assert record["kept"] == (expected is None)


def test_generate_writes_journals(first_run):
    folder, _ = first_run

    for name in JOURNALS:
        assert sorted(_journal_ids(folder / name)) == sorted(prompt.id for prompt in PROMPTS), name


def test_generate_journal_matches_records(first_run):
    folder, records = first_run
    revisions = {json.loads(line)["id"]: json.loads(line) for line in (folder / "round1_revision.jsonl").read_text().splitlines()}

    for record in records:
        assert revisions[record["id"]]["text"] == record["revision"]


def test_rerun_complete_generates_nothing(first_run, generator, constitution, tmp_path):
    folder, records = first_run
    copy = tmp_path / "cai"
    shutil.copytree(folder, copy)
    before = {name: (copy / name).read_text() for name in JOURNALS}

    again = cai.generate_cai_records(generator, constitution, PROMPTS, TINY_CAI, copy)

    assert again == records
    assert {name: (copy / name).read_text() for name in JOURNALS} == before


def test_first_run_texts_vary(first_run):
    # Identical texts would let the resume tests pass without reproducing any sample.
    _, records = first_run
    texts = [record["initial_response"] for record in records] + [record["revision"] for record in records]

    assert len(set(texts)) == len(texts)


def test_resume_after_crash(first_run, generator, constitution, tmp_path):
    folder, records = first_run
    copy = tmp_path / "cai"
    shutil.copytree(folder, copy)

    # Simulate a crash in the middle of writing the last revision, which leaves half its line.
    journal = copy / "round1_revision.jsonl"
    lines = journal.read_text(encoding="utf-8").splitlines(keepends=True)
    journal.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2], encoding="utf-8")

    resumed = cai.generate_cai_records(generator, constitution, PROMPTS, TINY_CAI, copy)

    assert resumed == records
    for name in JOURNALS:
        ids = _journal_ids(copy / name)
        assert len(ids) == len(set(ids)) == len(PROMPTS), name


def test_resume_missing_stage(first_run, generator, constitution, tmp_path):
    folder, records = first_run
    copy = tmp_path / "cai"
    shutil.copytree(folder, copy)
    (copy / "round1_revision.jsonl").unlink()

    assert cai.generate_cai_records(generator, constitution, PROMPTS, TINY_CAI, copy) == records


# ---------------------------------------------------------------------------------------------
# Dataset and SFT examples.


@pytest.fixture()
def mixed_records():
    return [
        _record("a", "harassment", "I will not help with that, but here is a kinder plan.", None),
        _record("b", "harassment", "", "empty"),
        _record("c", "illegal_behaviour", "Shoplifting harms workers; here is how to get help instead.", None),
        _record("d", "illegal_behaviour", "ok", "too_short"),
        _record("e", "harassment", "Stop", "too_short"),
        _record("f", "harassment", "Here is the revised response: no.", "meta_talk"),
        _record("g", "harassment", "A calmer approach would be to talk it through.", None),
    ]


def test_write_dataset_kept_only(mixed_records, tmp_path):
    from datasets import load_from_disk

    cai.write_dataset(mixed_records, tmp_path, {"constitution": "consequentialism"})
    dataset = load_from_disk(str(tmp_path / cai.DATASET_DIR))

    assert dataset["id"] == ["a", "c", "g"]
    assert dataset["revision"][1] == mixed_records[2]["revision"]


def test_write_dataset_rounds_as_json(mixed_records, tmp_path):
    from datasets import load_from_disk

    cai.write_dataset(mixed_records, tmp_path, {})
    dataset = load_from_disk(str(tmp_path / cai.DATASET_DIR))

    assert json.loads(dataset["rounds"][0]) == mixed_records[0]["rounds"]


def test_write_dataset_manifest(mixed_records, tmp_path):
    returned = cai.write_dataset(mixed_records, tmp_path, {"constitution": "consequentialism"})
    manifest = json.loads((tmp_path / cai.MANIFEST_FILE).read_text())

    assert manifest == returned
    assert manifest["num_prompts"] == 7
    assert manifest["num_kept"] == 3
    assert manifest["num_filtered"] == 4
    assert manifest["filtered_by_reason"] == {"empty": 1, "too_short": 2, "meta_talk": 1}
    assert manifest["kept_per_subcategory"] == {"harassment": 2, "illegal_behaviour": 1}
    assert manifest["constitution"] == "consequentialism"


def test_write_dataset_all_records_jsonl(mixed_records, tmp_path):
    cai.write_dataset(mixed_records, tmp_path, {})
    lines = (tmp_path / cai.RECORDS_FILE).read_text().splitlines()

    assert [json.loads(line) for line in lines] == mixed_records


def test_write_dataset_replaces_old(mixed_records, tmp_path):
    from datasets import load_from_disk

    cai.write_dataset(mixed_records, tmp_path, {})
    cai.write_dataset(mixed_records[:1], tmp_path, {})
    dataset = load_from_disk(str(tmp_path / cai.DATASET_DIR))

    assert dataset["id"] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [cai.RECORDS_FILE, cai.DATASET_DIR, cai.MANIFEST_FILE]


def test_sft_examples_kept_only(mixed_records):
    examples = cai.sft_examples(mixed_records)

    assert examples == [
        [{"role": "user", "content": "prompt a"}, {"role": "assistant", "content": mixed_records[0]["revision"]}],
        [{"role": "user", "content": "prompt c"}, {"role": "assistant", "content": mixed_records[2]["revision"]}],
        [{"role": "user", "content": "prompt g"}, {"role": "assistant", "content": mixed_records[6]["revision"]}],
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I won't help with that. Talk to your neighbour calmly. You could also ask a medi",
         "I won't help with that. Talk to your neighbour calmly."),
        ('She said "no." Then she left! And', 'She said "no." Then she left!'),
        ("First paragraph without a full stop\n\nSecond paragraph that is cut", "First paragraph without a full stop"),
        ("Short. Then a long rambling continuation that goes on without any sentence end", None),
        ("no sentence end at all", None),
    ],
)
def test_trim_to_last_sentence(text, expected):
    assert cai.trim_to_last_sentence(text) == expected
