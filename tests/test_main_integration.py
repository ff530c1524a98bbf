"""The main job end to end on the packaged SmolLM2-135M-Instruct, with a tiny override.

Runs `python -m ea_jax.main` as a user would, checks every artifact of the run folder, then
reruns the same command and checks that finished stages are skipped.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TINY_OVERRIDES = [
    "--config.data.max_train_prompts=4",
    "--config.data.max_eval_prompts_per_subcategory=1",
    "--config.data.max_benign_prompts=8",
    "--config.data.max_persona_statements_per_dimension=4",
    "--config.generation.batch_size=8",
    "--config.cai.answer_max_new_tokens=48",
    "--config.cai.critique_max_new_tokens=48",
    "--config.cai.revision_max_new_tokens=64",
    # Keep every revision, however short or cut off: the test needs SFT examples, not quality.
    "--config.cai.min_revision_words=0",
    "--config.cai.keep_truncated=True",
    "--config.sft.num_steps=3",
    "--config.sft.batch_size=2",
    "--config.sft.grad_accum_steps=1",
    "--config.sft.checkpoint_every=2",
    "--config.eval.max_new_tokens=24",
    "--config.eval.bootstrap_resamples=200",
]


def run_main(output_dir: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "ea_jax.main", "--config=configs/consequentialist_narrow.py",
        f"--config.output_dir={output_dir}", *TINY_OVERRIDES,
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("runs")
    result = run_main(output_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir / "consequentialism_narrow", result


@pytest.mark.integration
def test_main_prints_report_path_last(finished_run):
    run_dir, result = finished_run
    last_lines = result.stdout.strip().splitlines()[-2:]
    assert last_lines[0] == f"Report: {run_dir / 'report.md'}"
    assert last_lines[1] == f"Run folder: {run_dir}"


@pytest.mark.integration
def test_main_writes_config_and_environment(finished_run):
    run_dir, _ = finished_run
    config = json.loads((run_dir / "config.json").read_text())
    environment = json.loads((run_dir / "environment.json").read_text())
    assert config["constitution"] == "consequentialism"
    assert config["sft"]["num_steps"] == 3
    assert environment["packages"]["jax"]
    assert "git_commit" in environment


@pytest.mark.integration
def test_main_records_scope(finished_run):
    run_dir, _ = finished_run
    scope = json.loads((run_dir / "data" / "scope.json").read_text())
    assert scope["scope"] == "narrow"
    assert len(scope["train_prompt_ids_used"]) == 4
    dropped_reasons = " ".join(entry["reason"] for entry in scope["dropped"])
    assert "stalking" in dropped_reasons
    assert "fraud" in dropped_reasons


@pytest.mark.integration
def test_main_writes_cai_dataset(finished_run):
    from datasets import load_from_disk

    run_dir, _ = finished_run
    records = read_jsonl(run_dir / "cai" / "cai.jsonl")
    manifest = json.loads((run_dir / "cai" / "manifest.json").read_text())
    dataset = load_from_disk(str(run_dir / "cai" / "dataset"))
    assert len(records) == 4
    assert manifest["num_prompts"] == 4
    assert len(dataset) == manifest["num_kept"]
    for record in records:
        assert record["initial_response"]
        assert record["rounds"][0]["critique"]
        assert record["principle_ids"][0].startswith("consequentialism-")
        assert record["model_id"].startswith("SmolLM2-135M-Instruct")
        assert record["subcategory"] in ("harassment", "illegal_behaviour")


@pytest.mark.integration
def test_main_finetuned_model_differs(finished_run):
    from ea_jax.loading import load_model

    run_dir, _ = finished_run
    model_dir = run_dir / "sft" / "model"
    finetuned = load_model(str(model_dir))
    source = load_model("default")
    flat = lambda state: np.concatenate([np.ravel(x) for x in __import__("jax").tree_util.tree_leaves(state)])
    difference = np.abs(flat(finetuned.params) - flat(source.params)).max()
    assert difference > 0
    assert (run_dir / "sft" / "checkpoints").is_dir()
    assert any((run_dir / "sft" / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.integration
def test_main_saves_labelled_responses(finished_run):
    run_dir, _ = finished_run
    for model in ("source", "finetuned"):
        responses = read_jsonl(run_dir / "eval" / model / "responses.jsonl")
        persona_rows = read_jsonl(run_dir / "eval" / model / "persona.jsonl")
        assert sum(r["kind"] == "redteam" for r in responses) == 24  # one per subcategory
        assert sum(r["kind"] == "benign" for r in responses) == 8
        assert {r["label"] for r in responses} <= {"refusal", "compliance", "unscorable"}
        assert len(persona_rows) == 16  # 4 statements x 4 dimensions
        assert all(0.0 <= row["p_yes"] <= 1.0 for row in persona_rows)


@pytest.mark.integration
def test_main_writes_metrics_and_report(finished_run):
    run_dir, _ = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = (run_dir / "report.md").read_text()
    assert set(metrics["safety"]) == {"source", "finetuned"}
    assert metrics["safety"]["source"]["per_subcategory"]["illegal_behaviour"]["group"] == "trained"
    assert metrics["safety"]["source"]["per_subcategory"]["stalking"]["group"] == "filtered_out"
    assert set(metrics["persona"]["finetuned"]["shifts"]) == {"consequentialist", "deontological", "virtue", "deference"}
    assert "## Ethical persona" in report
    for plot in ("harmful_compliance_by_category", "over_refusal_by_category", "harmful_compliance_by_subcategory", "persona"):
        path = run_dir / "plots" / f"{plot}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert f"plots/{plot}.png" in report


@pytest.mark.integration
def test_main_rerun_skips_finished_stages(finished_run):
    run_dir, _ = finished_run
    before = (run_dir / "eval" / "finetuned" / "responses.jsonl").read_text()
    result = run_main(run_dir.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stderr
    assert "CAI data is up to date" in log
    assert "skipping SFT" in log
    assert "evaluation of the source model is up to date" in log
    assert "evaluation of the finetuned model is up to date" in log
    assert (run_dir / "eval" / "finetuned" / "responses.jsonl").read_text() == before
