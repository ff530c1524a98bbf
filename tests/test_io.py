"""Crash-safe file helpers: atomic writes, JSONL journals, config hashes, folder replacement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ea_jax import io


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_atomic_write_replaces_content(tmp_path):
    path = tmp_path / "out.txt"
    io.atomic_write_text(path, "first")
    io.atomic_write_text(path, "second")

    assert path.read_text(encoding="utf-8") == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    io.atomic_write_text(path, "text")

    assert path.read_text(encoding="utf-8") == "text"


def test_atomic_write_failure_keeps_old(tmp_path):
    path = tmp_path / "out.txt"
    io.atomic_write_text(path, "old")

    # A non-string fails inside the write, after the temporary file exists.
    with pytest.raises(TypeError):
        io.atomic_write_text(path, 123)

    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_bytes_round_trip(tmp_path):
    path = tmp_path / "out.bin"
    io.atomic_write_bytes(path, b"\x89PNG\x00\xff")

    assert path.read_bytes() == b"\x89PNG\x00\xff"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_json_numpy(tmp_path):
    path = tmp_path / "out.json"
    io.atomic_write_json(path, {"count": np.int64(3), "values": np.array([0.5, 1.5]), "pair": (1, 2)})

    assert json.loads(path.read_text(encoding="utf-8")) == {"count": 3, "values": [0.5, 1.5], "pair": [1, 2]}


def test_journal_round_trip(tmp_path):
    path = tmp_path / "journal.jsonl"
    records = [{"id": "a", "text": "one"}, {"id": "b", "text": "twö\nlines"}]
    io.append_jsonl(path, records[:1])
    io.append_jsonl(path, records[1:])

    assert io.read_journal(path) == {"a": records[0], "b": records[1]}


def test_journal_missing_file_is_empty(tmp_path):
    assert io.read_journal(tmp_path / "missing.jsonl") == {}


def test_journal_custom_key(tmp_path):
    path = tmp_path / "journal.jsonl"
    io.append_jsonl(path, [{"name": 7, "text": "x"}])

    assert io.read_journal(path, key="name") == {"7": {"name": 7, "text": "x"}}


def test_journal_partial_last_line_dropped(tmp_path):
    path = tmp_path / "journal.jsonl"
    io.append_jsonl(path, [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"id": "c", "te')  # a crash in the middle of a write

    records = io.read_journal(path)

    assert list(records) == ["a", "b"]
    assert path.read_text(encoding="utf-8") == '{"id": "a", "text": "one"}\n{"id": "b", "text": "two"}\n'


def test_journal_append_after_partial_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    io.append_jsonl(path, [{"id": "a", "text": "one"}])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"id": "b", "te')
    io.read_journal(path)

    io.append_jsonl(path, [{"id": "b", "text": "two"}])

    assert io.read_journal(path) == {"a": {"id": "a", "text": "one"}, "b": {"id": "b", "text": "two"}}


def test_journal_only_partial_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"id": "a", "te', encoding="utf-8")

    assert io.read_journal(path) == {}
    assert path.read_text(encoding="utf-8") == ""


def test_journal_malformed_middle_raises(tmp_path):
    path = tmp_path / "journal.jsonl"
    _write_lines(path, ['{"id": "a"}', '{"id": "b", oops}', '{"id": "c"}'])

    with pytest.raises(ValueError, match=r"journal\.jsonl:2 is not valid JSON"):
        io.read_journal(path)


def test_journal_malformed_middle_untouched(tmp_path):
    path = tmp_path / "journal.jsonl"
    _write_lines(path, ['{"id": "a"}', '{"id": "b", oops}', '{"id": "c"}'])
    before = path.read_text(encoding="utf-8")

    with pytest.raises(ValueError):
        io.read_journal(path)

    assert path.read_text(encoding="utf-8") == before


def test_journal_duplicate_keeps_first(tmp_path):
    path = tmp_path / "journal.jsonl"
    io.append_jsonl(path, [{"id": "a", "text": "first"}, {"id": "b", "text": "other"}])
    io.append_jsonl(path, [{"id": "a", "text": "second"}])

    records = io.read_journal(path)

    assert records["a"]["text"] == "first"
    assert len(records) == 2


def test_journal_skips_blank_lines(tmp_path):
    path = tmp_path / "journal.jsonl"
    _write_lines(path, ['{"id": "a"}', "", '{"id": "b"}'])

    assert list(io.read_journal(path)) == ["a", "b"]


def test_config_hash_same_value():
    first = {"model_id": "m", "prompt_ids": ["a", "b"], "cai": {"rounds": 1, "seed": 0}}
    second = {"model_id": "m", "prompt_ids": ["a", "b"], "cai": {"rounds": 1, "seed": 0}}

    assert io.config_hash(first) == io.config_hash(second)


def test_config_hash_length():
    digest = io.config_hash({"a": 1})

    assert len(digest) == 16
    assert int(digest, 16) >= 0


def test_config_hash_different_value():
    base = {"model_id": "m", "prompt_ids": ["a", "b"], "cai": {"rounds": 1, "seed": 0}}
    changed_nested = {"model_id": "m", "prompt_ids": ["a", "b"], "cai": {"rounds": 2, "seed": 0}}
    changed_list = {"model_id": "m", "prompt_ids": ["a", "c"], "cai": {"rounds": 1, "seed": 0}}

    assert io.config_hash(base) != io.config_hash(changed_nested)
    assert io.config_hash(base) != io.config_hash(changed_list)


def test_config_hash_numpy_matches_python():
    assert io.config_hash({"n": np.int64(3)}) == io.config_hash({"n": 3})
    assert io.config_hash({"t": (1, 2)}) == io.config_hash({"t": [1, 2]})


def test_config_hash_unserialisable_raises():
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        io.config_hash({"x": object()})


def test_replace_directory_existing(tmp_path):
    target = tmp_path / "dataset"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = tmp_path / ".dataset.staging"
    staging.mkdir()
    (staging / "new.txt").write_text("new")

    io.replace_directory(staging, target)

    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_replace_directory_missing_target(tmp_path):
    target = tmp_path / "dataset"
    staging = tmp_path / ".dataset.staging"
    staging.mkdir()
    (staging / "new.txt").write_text("new")

    io.replace_directory(staging, target)

    assert (target / "new.txt").read_text() == "new"
    assert not staging.exists()
