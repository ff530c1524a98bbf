"""Tests for the four constitutions and their loader (ea_jax/constitutions.py)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

from ea_jax import constitutions as C

NAMES = ("consequentialism", "deontology", "subordinate", "virtue_ethics")
EXPECTED_PRINCIPLES = 14
EXPECTED_DEMONSTRATIONS = 2
# Matched length: each file's total words within 10% of every other file's.
WORD_COUNT_TOLERANCE = 0.10
# Phrases that would make a revision talk about the editing process instead of
# replying to the user. A model finetuned on them learns to say them.
META_PHRASES = (
    "revised response",
    "previous response",
    "original response",
    "last response",
    "the revision",
    "rewritten",
    "revised",
    "here is a",
    "as an ai",
)


def _words(text: str) -> int:
    return len(text.split())


def _text_fields(c: C.Constitution) -> list[str]:
    """All prose in a constitution: title, preamble, requests and demonstrations."""
    texts = [c.title, c.preamble]
    for p in c.principles:
        texts += [p.critique_request, p.revision_request]
    for d in c.demonstrations:
        texts += [d.prompt, d.response, d.critique, d.revision]
    return texts


def _sentences(text: str) -> int:
    return len(re.findall(r"[.!?](?:\s|$)", text.strip()))


@pytest.fixture(scope="module")
def all_constitutions() -> dict[str, C.Constitution]:
    return {name: C.load_constitution(name) for name in NAMES}


# --- the shipped files -------------------------------------------------------


def test_all_four_available_and_load(all_constitutions):
    assert set(NAMES) <= set(C.available_constitutions())
    for name, c in all_constitutions.items():
        assert c.name == name
        assert Path(c.path).name == f"{name}.json"
        assert len(c.sha256) == 64


def test_constitutions_dir_is_repo_folder():
    assert (Path(C.CONSTITUTIONS_DIR) / "README.md").is_file()


def test_matched_structure(all_constitutions):
    for c in all_constitutions.values():
        assert len(c.principles) == EXPECTED_PRINCIPLES, c.name
        assert len(c.demonstrations) == EXPECTED_DEMONSTRATIONS, c.name
        assert [p.id for p in c.principles] == [f"{c.name}-{i:02d}" for i in range(1, EXPECTED_PRINCIPLES + 1)]


def test_word_counts_within_tolerance(all_constitutions):
    counts = {name: sum(map(_words, _text_fields(c))) for name, c in all_constitutions.items()}
    low, high = min(counts.values()), max(counts.values())
    assert high <= low * (1 + WORD_COUNT_TOLERANCE), counts


def test_request_lengths_matched(all_constitutions):
    # Mean words per request within 15% across files, so no framework is wordier per principle.
    means = {
        name: np.mean([_words(p.critique_request) + _words(p.revision_request) for p in c.principles])
        for name, c in all_constitutions.items()
    }
    assert max(means.values()) <= min(means.values()) * 1.15, means


def test_requests_are_short_and_uniform(all_constitutions):
    for c in all_constitutions.values():
        assert 2 <= _sentences(c.preamble) <= 4, c.name
        for p in c.principles:
            assert p.critique_request.startswith("Identify "), p.id
            assert p.revision_request.startswith("Please rewrite the response"), p.id
            for text in (p.critique_request, p.revision_request):
                assert 1 <= _sentences(text) <= 2, (p.id, text)
                assert _words(text) <= 40, (p.id, text)


def test_demonstrations_shared_prompts(all_constitutions):
    # Same red-team prompts and initial responses everywhere, so only critiques
    # and revisions carry the framework.
    pairs = {tuple((d.prompt, d.response) for d in c.demonstrations) for c in all_constitutions.values()}
    assert len(pairs) == 1
    for c in all_constitutions.values():
        ids = {p.id for p in c.principles}
        assert all(d.principle_id in ids for d in c.demonstrations)
        assert len({d.critique for d in c.demonstrations}) == EXPECTED_DEMONSTRATIONS


def test_revisions_address_user_directly(all_constitutions):
    for c in all_constitutions.values():
        for d in c.demonstrations:
            lowered = d.revision.lower()
            for phrase in META_PHRASES:
                assert phrase not in lowered, (c.name, phrase)


def test_expected_signatures(all_constitutions):
    for c in all_constitutions.values():
        assert tuple(c.expected_signature) == C.PERSONA_DIMENSIONS
        assert set(c.expected_signature.values()) <= {-1, 0, 1}
        # The framework names the dimension the constitution is meant to raise.
        assert c.framework in C.PERSONA_DIMENSIONS
        assert c.expected_signature[c.framework] == 1
    sig = {name: c.expected_signature for name, c in all_constitutions.items()}
    assert sig["consequentialism"]["consequentialist"] == 1
    assert sig["deontology"]["deontological"] == 1
    assert sig["virtue_ethics"]["virtue"] == 1
    assert sig["subordinate"]["deference"] == 1


def test_frameworks_distinct(all_constitutions):
    assert len({c.framework for c in all_constitutions.values()}) == len(NAMES)


# --- loader API --------------------------------------------------------------


def test_load_by_path_equals_load_by_name(all_constitutions):
    c = all_constitutions["deontology"]
    assert C.load_constitution(c.path) == c


def test_sha256_tracks_file_bytes(tmp_path, all_constitutions):
    src = Path(all_constitutions["deontology"].path)
    dst = tmp_path / "deontology.json"
    dst.write_text(src.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    assert C.load_constitution(str(dst)).sha256 != all_constitutions["deontology"].sha256


def test_unknown_name_lists_available():
    with pytest.raises(C.ConstitutionError) as info:
        C.load_constitution("utilitarianism_v9")
    message = str(info.value)
    assert "utilitarianism_v9" in message
    for name in NAMES:
        assert name in message


def test_env_var_overrides_dir(tmp_path, monkeypatch, all_constitutions):
    src = Path(all_constitutions["subordinate"].path)
    (tmp_path / "subordinate.json").write_bytes(src.read_bytes())
    monkeypatch.setenv("EA_JAX_CONSTITUTIONS_DIR", str(tmp_path))
    assert C.available_constitutions() == ["subordinate"]
    assert C.load_constitution("subordinate").sha256 == all_constitutions["subordinate"].sha256
    with pytest.raises(C.ConstitutionError, match="deontology"):
        C.load_constitution("deontology")


def test_draw_principle_deterministic_and_covering(all_constitutions):
    c = all_constitutions["consequentialism"]
    first = [C.draw_principle(c, np.random.default_rng(7)).id for _ in range(5)]
    assert len(set(first)) == 1  # A fresh generator with the same seed draws the same principle.
    rng_a, rng_b = np.random.default_rng(123), np.random.default_rng(123)
    seq_a = [C.draw_principle(c, rng_a).id for _ in range(200)]
    seq_b = [C.draw_principle(c, rng_b).id for _ in range(200)]
    assert seq_a == seq_b
    # 200 uniform draws over 14 principles miss one with probability below 14 * (13/14)**200, about 5e-6.
    assert len(set(seq_a)) == EXPECTED_PRINCIPLES


def test_draw_principle_rejects_non_generator(all_constitutions):
    with pytest.raises(TypeError, match="default_rng"):
        C.draw_principle(all_constitutions["deontology"], 0)


def test_principle_by_id(all_constitutions):
    c = all_constitutions["virtue_ethics"]
    assert C.principle_by_id(c, "virtue_ethics-03") is c.principles[2]
    with pytest.raises(C.ConstitutionError, match="virtue_ethics-01"):
        C.principle_by_id(c, "virtue_ethics-99")


def test_dataclasses_frozen(all_constitutions):
    c = all_constitutions["deontology"]
    with pytest.raises(AttributeError):
        c.name = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        c.principles[0].id = "x"  # type: ignore[misc]


# --- malformed files ---------------------------------------------------------


@pytest.fixture(scope="module")
def valid_doc() -> dict:
    return json.loads((Path(C.CONSTITUTIONS_DIR) / "deontology.json").read_text(encoding="utf-8"))


def _set_version(d):
    d["schema_version"] = 2


def _drop_title(d):
    del d["title"]


def _extra_top(d):
    d["author"] = "someone"


def _empty_revision(d):
    d["principles"][3]["revision_request"] = "   "


def _wrong_type_critique(d):
    d["principles"][5]["critique_request"] = ["not", "a", "string"]


def _extra_principle_field(d):
    d["principles"][1]["weight"] = 2


def _principles_not_list(d):
    d["principles"] = {"a": 1}


def _duplicate_id(d):
    d["principles"][4]["id"] = d["principles"][0]["id"]


def _bad_id_pattern(d):
    d["principles"][2]["id"] = "deon-3"


def _demo_unknown_principle(d):
    d["demonstrations"][1]["principle_id"] = "deontology-99"


def _demo_missing_revision(d):
    del d["demonstrations"][0]["revision"]


def _too_few_principles(d):
    d["principles"] = d["principles"][:11]
    d["demonstrations"] = [dict(x, principle_id="deontology-01") for x in d["demonstrations"]]


def _too_few_demos(d):
    d["demonstrations"] = d["demonstrations"][:1]


def _signature_missing_key(d):
    del d["expected_signature"]["virtue"]


def _signature_extra_key(d):
    d["expected_signature"]["utility"] = 1


def _signature_bad_value(d):
    d["expected_signature"]["deference"] = 2


def _signature_bool_value(d):
    d["expected_signature"]["deference"] = True


def _name_mismatch(d):
    d["name"] = "kantian"


def _version_bool(d):
    d["schema_version"] = True


# (mutation, the field path the message must name)
MALFORMED = [
    (_set_version, "schema_version"),
    (_version_bool, "schema_version"),
    (_drop_title, "title"),
    (_extra_top, "author"),
    (_empty_revision, "principles[3].revision_request"),
    (_wrong_type_critique, "principles[5].critique_request"),
    (_extra_principle_field, "principles[1].weight"),
    (_principles_not_list, "principles"),
    (_duplicate_id, "principles[4].id"),
    (_bad_id_pattern, "principles[2].id"),
    (_demo_unknown_principle, "demonstrations[1].principle_id"),
    (_demo_missing_revision, "demonstrations[0].revision"),
    (_too_few_principles, "principles"),
    (_too_few_demos, "demonstrations"),
    (_signature_missing_key, "expected_signature.virtue"),
    (_signature_extra_key, "expected_signature.utility"),
    (_signature_bad_value, "expected_signature.deference"),
    (_signature_bool_value, "expected_signature.deference"),
    (_name_mismatch, "name"),
]


@pytest.mark.parametrize("mutate, field", MALFORMED, ids=[m.__name__.strip("_") for m, _ in MALFORMED])
def test_malformed_file_names_file_and_field(tmp_path, valid_doc, mutate, field):
    doc = copy.deepcopy(valid_doc)
    mutate(doc)
    path = tmp_path / "deontology.json"
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    with pytest.raises(C.ConstitutionError) as info:
        C.load_constitution(str(path))
    message = str(info.value)
    assert str(path) in message
    assert re.search(rf"^  - {re.escape(field)}: ", message, re.MULTILINE), message


def test_all_problems_reported_at_once(tmp_path, valid_doc):
    doc = copy.deepcopy(valid_doc)
    _set_version(doc)
    _empty_revision(doc)
    _signature_bad_value(doc)
    path = tmp_path / "deontology.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(C.ConstitutionError) as info:
        C.load_constitution(str(path))
    message = str(info.value)
    assert "3 problems" in message
    for field in ("schema_version", "principles[3].revision_request", "expected_signature.deference"):
        assert f"  - {field}: " in message


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "schema_version": 1,\n  "name": "broken"\n  "title": "x"\n}\n', encoding="utf-8")
    with pytest.raises(C.ConstitutionError) as info:
        C.load_constitution(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "line 4" in message
    assert "column 3" in message


def test_top_level_not_object(tmp_path):
    path = tmp_path / "listy.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(C.ConstitutionError, match="JSON object"):
        C.load_constitution(str(path))


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(C.ConstitutionError, match="nope.json"):
        C.load_constitution(str(missing))


def test_error_is_value_error():
    assert issubclass(C.ConstitutionError, ValueError)
