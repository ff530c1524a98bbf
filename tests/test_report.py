"""report.md and plots from a metrics dict built by the evaluation functions on synthetic labels."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ea_jax import evaluation, io, persona, report
from ea_jax.constitutions import load_constitution
from ea_jax.prompts import load_taxonomy

TRAINED = ("harassment", "illegal_behaviour")
FILTERED_OUT = ("stalking", "fraud")
RESAMPLES = 100
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENV = {"git_commit": "0123abc", "git_dirty": True, "packages": {"jax": "0.10.2", "flax": "0.12.8"}}

# (id, subcategory, source label, finetuned label). Subcategories not listed get no records,
# so their rates and changes are undefined.
REDTEAM = (
    ("h1", "harassment", "compliance", "refusal"), ("h2", "harassment", "compliance", "refusal"),
    ("h3", "harassment", "compliance", "compliance"), ("h4", "harassment", "refusal", "refusal"),
    ("s1", "stalking", "compliance", "compliance"), ("s2", "stalking", "unscorable", "refusal"),
    ("i1", "illegal_behaviour", "compliance", "refusal"), ("w1", "weapons", "compliance", "compliance"),
)
BENIGN = (("b1", "harassment_abuse", "refusal", "refusal"), ("b2", "crime", "compliance", "refusal"))


def _labelled(taxonomy, column):
    records = [
        {"id": rid, "kind": "redteam", "category": taxonomy.category_of(sub).id, "subcategory": sub,
         "label": labels[column]}
        for rid, sub, *labels in REDTEAM
    ]
    records += [
        {"id": rid, "kind": "benign", "category": category, "subcategory": None, "label": labels[column]}
        for rid, category, *labels in BENIGN
    ]
    return records


def _metrics(taxonomy, constitution):
    """The dict main.compute_metrics builds, with deference statements left out so its scores are None."""
    statements = [s for s in persona.load_statements() if s.dimension != "deference"]
    rng = np.random.default_rng(0)
    source_p_yes = rng.uniform(0.2, 0.8, len(statements))
    finetuned_p_yes = np.clip(source_p_yes + rng.normal(0.05, 0.05, len(statements)), 0.0, 1.0)
    source, finetuned = _labelled(taxonomy, 0), _labelled(taxonomy, 1)
    options = dict(trained_subcategories=TRAINED, filtered_out=FILTERED_OUT, seed=0, n_resamples=RESAMPLES)
    return {
        "models": {"source": "smollm2-test", "finetuned": "smollm2-test+sft:abc"},
        "constitution": constitution.name,
        "scope": "narrow",
        "trained_subcategories": list(TRAINED),
        "filtered_out": list(FILTERED_OUT),
        "expected_signature": constitution.expected_signature,
        "judge": "refusal_classifier_v1",
        "safety": {
            "source": evaluation.safety_metrics(source, taxonomy, **options),
            "finetuned": evaluation.safety_metrics(finetuned, taxonomy, **options),
        },
        "persona": {
            "source": evaluation.persona_metrics(
                source_p_yes, statements, source_p_yes=None, expected_signature=None, seed=0, n_resamples=RESAMPLES
            ),
            "finetuned": evaluation.persona_metrics(
                finetuned_p_yes, statements, source_p_yes=source_p_yes,
                expected_signature=constitution.expected_signature, seed=0, n_resamples=RESAMPLES,
            ),
        },
        "safety_change": evaluation.safety_change(source, finetuned, taxonomy, **options),
        "cai_manifest": {"num_prompts": 5, "num_kept": 3, "num_filtered": 2, "filtered_by_reason": {"truncated": 2}},
        "elapsed_seconds": 12.5,
    }


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy()


@pytest.fixture(scope="module")
def metrics(taxonomy):
    return _metrics(taxonomy, load_constitution("consequentialism"))


@pytest.fixture(scope="module")
def written(metrics, taxonomy, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    path = report.write_report(run_dir, metrics, taxonomy, ENV)
    return run_dir, path, path.read_text(encoding="utf-8")


def _row(text, first_cell):
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"expected one table row for {first_cell!r}, found {rows}"
    return rows[0]


def test_report_path(written):
    run_dir, path, _ = written

    assert path == run_dir / "report.md"


def test_report_names_constitution(written):
    _, _, text = written

    assert text.splitlines()[0] == "# Emergent alignment run: consequentialism, narrow scope"


def test_report_lists_categories(written, taxonomy):
    _, _, text = written

    for category in taxonomy.category_ids():
        assert _row(text, category)


def test_report_lists_subcategories(written, taxonomy):
    _, _, text = written

    for subcategory in taxonomy.subcategory_ids():
        assert _row(text, subcategory)


def test_report_lists_dimensions(written):
    _, _, text = written

    for dimension in persona.PERSONA_DIMENSIONS:
        assert _row(text, dimension)


def test_report_rate_cell(written):
    _, _, text = written

    # 3 of 4 harassment prompts comply with the source model and 1 of 4 with the finetuned one.
    assert "| 75.0% [" in _row(text, "harassment")
    assert "(3/4)" in _row(text, "harassment")
    assert "(1/4)" in _row(text, "harassment")


def test_report_change_cell(written):
    _, _, text = written

    # Paired differences on harassment: -1, -1, 0, 0.
    assert "-50.0 pp [" in _row(text, "harassment")
    assert "(n=4)" in _row(text, "harassment")


def test_report_counts_unscorable(written):
    _, _, text = written

    assert "(1/2), 1 unscorable" in _row(text, "stalking")


def test_report_none_rate_is_na(written):
    _, _, text = written
    cells = [cell.strip() for cell in _row(text, "hate_speech").strip("|").split("|")]

    assert cells[3:] == ["n/a (0 samples)", "n/a (0 samples)", "n/a"]


def test_report_none_score_is_na(written):
    _, _, text = written
    cells = [cell.strip() for cell in _row(text, "deference").strip("|").split("|")]

    assert cells == ["deference", "0", "n/a", "n/a", "n/a", "n/a"]


def test_report_undefined_cosine(written):
    _, _, text = written

    # The deference shift is undefined, so the shift vector has no cosine.
    assert "expected signature: undefined." in text


def test_report_expected_sign(written):
    _, _, text = written

    assert _row(text, "consequentialist").startswith("| consequentialist | + |")


def test_report_environment(written):
    _, _, text = written

    assert "Git commit `0123abc` (uncommitted changes)" in text
    assert "jax 0.10.2, flax 0.12.8; 12.5 s in this invocation" in text


def test_report_cai_counts(written):
    _, _, text = written

    assert "5 prompts, 3 revisions kept for SFT (0 of them trimmed to their last complete sentence), 2 filtered (truncated: 2)." in text


def test_report_writes_pngs(written):
    run_dir, _, _ = written
    plots = sorted((run_dir / report.PLOTS_DIR).iterdir())

    assert len(plots) == 4
    for plot in plots:
        assert plot.suffix == ".png"
        assert plot.read_bytes().startswith(PNG_SIGNATURE), plot.name


def test_report_image_links_exist(written):
    run_dir, _, text = written
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)

    assert len(links) == 4
    for link in links:
        assert (run_dir / link).is_file(), link


def test_report_from_metrics_json(written, metrics, taxonomy, tmp_path):
    # A report rebuilt from metrics.json must read the same as one from the in-memory dict.
    _, _, text = written
    reloaded = json.loads(io.to_json(metrics))

    path = report.write_report(tmp_path, reloaded, taxonomy, ENV)

    assert path.read_text(encoding="utf-8") == text
