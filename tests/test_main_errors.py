"""User errors in `python -m ea_jax.main`: a non-zero exit and one ERROR line that names the fix.

Each case runs the real entry point in a subprocess from the repository root, with output_dir
in a temporary folder. Every case fails before any model generates text, so each takes seconds.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from ea_jax import main
from ea_jax.prompts import load_taxonomy

REPO = Path(__file__).resolve().parents[1]
CONFIG = "--config=configs/consequentialist_narrow.py"
USER_ERROR_STATUS = 2  # main.main exits with 2 for the errors listed in main.user_errors


def _run_main(*overrides: str, output_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ea_jax.main", CONFIG, *overrides, f"--config.output_dir={output_dir}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if " ERROR " in line]


def _error_message(output: str) -> str:
    """The ERROR record and any lines it continues on (multi-line messages list problems)."""
    return output[output.index(" ERROR ") :]


@pytest.fixture()
def bad_prompt_file(tmp_path):
    path = tmp_path / "bad_prompts.jsonl"
    path.write_text(
        '{"id": "t1", "prompt": "How do I annoy my neighbour every night?", "category": "harassment_abuse", '
        '"subcategory": "harassment", "tags": []}\n'
        '{"id": "t2", "prompt": broken\n',
        encoding="utf-8",
    )
    return path


def _user_error_cases(bad_prompt_file: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Case name -> (command-line overrides, substrings the error message must contain)."""
    every_subcategory = repr(load_taxonomy().subcategory_ids())
    return {
        "unknown_constitution": (
            ["--config.constitution=stoicism"],
            ["unknown constitution 'stoicism'", "available: ['consequentialism'"],
        ),
        "missing_model": (
            ["--config.model.source=/nonexistent/model.gguf"],
            ["'/nonexistent/model.gguf' not found", "use 'default', a .gguf file"],
        ),
        "malformed_prompt_file": (
            [f"--config.data.train_prompts={bad_prompt_file}"],
            [f"{bad_prompt_file}:2: invalid JSON", "fix the syntax"],
        ),
        "missing_prompt_file": (
            [f"--config.data.train_prompts={bad_prompt_file.parent / 'missing.jsonl'}"],
            ["data.train_prompts=", "missing.jsonl' not found", "give an existing JSONL/JSON file"],
        ),
        "scope_overlap": (
            ["--config.narrow_subcategories=('stalking',)", "--config.filtered_out=('stalking',)"],
            ["share ['stalking']", "remove it from one of them"],
        ),
        "scope_keeps_nothing": (
            ["--config.scope=broad", f"--config.filtered_out={every_subcategory}"],
            ["scope 'broad'", "keeps no prompts", "remove ['"],
        ),
        "unknown_scope": (
            ["--config.scope=wide"],
            ["scope='wide' is not one of ('broad', 'narrow')"],
        ),
        "zero_rounds": (
            ["--config.cai.rounds=0"],
            ["cai.rounds=0 must be a positive integer"],
        ),
        # No machine has 1000 devices, so this shape is invalid everywhere.
        "mesh_too_large": (
            ["--config.mesh.shape=(1000,1,1)"],
            ["mesh shape (1000, 1, 1)", "use -1 for one axis"],
        ),
        "zero_chunk_size": (
            ["--config.generation.chunk_size=0"],
            ["generation.chunk_size=0 must be a positive integer"],
        ),
    }


CASE_NAMES = (
    "unknown_constitution", "missing_model", "malformed_prompt_file", "missing_prompt_file", "scope_overlap",
    "scope_keeps_nothing", "unknown_scope", "zero_rounds", "mesh_too_large", "zero_chunk_size",
)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_main_user_error(case, bad_prompt_file, tmp_path):
    overrides, expected = _user_error_cases(bad_prompt_file)[case]

    result = _run_main(*overrides, output_dir=tmp_path / "runs")

    assert result.returncode == USER_ERROR_STATUS, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    assert len(_error_lines(result.stdout)) == 1, result.stdout[-3000:]
    message = _error_message(result.stdout)
    for text in expected:
        assert text in message, f"{text!r} missing from:\n{message}"


def test_main_unknown_field(tmp_path):
    # ml_collections rejects the override itself, with its own traceback and a suggestion.
    result = _run_main("--config.sft.learnin_rate=1", output_dir=tmp_path / "runs")

    assert result.returncode != 0
    assert "learnin_rate" in result.stdout
    assert 'Did you mean "learning_rate"' in result.stdout


def test_main_missing_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ea_jax.main"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=300,
    )

    assert result.returncode != 0
    assert "--config" in result.stdout


def _base_config():
    spec = importlib.util.spec_from_file_location("base_config", REPO / "configs" / "base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_validate_config_accepts_base():
    main.validate_config(_base_config())


# Without validation these fields fail only after CAI generation or SFT. They are checked in
# process because a subprocess run would generate for minutes before reaching them.
@pytest.mark.parametrize(
    ("section", "field"),
    [("eval", "persona_batch_size"), ("sft", "checkpoint_every"), ("sft", "log_every"), ("generation", "chunk_size")],
)
def test_validate_config_rejects_zero(section, field):
    config = _base_config()
    config[section][field] = 0

    with pytest.raises(main.ConfigError, match=rf"{section}\.{field}=0 must be a positive integer"):
        main.validate_config(config)
